"""`multitoken serve`: an OpenAI-compatible HTTP server over one engine, continuously batched.

protocol.py reads and checks requests and writes OpenAI's response objects; loop.py is the one
background thread that owns the engine and decodes every request's row; app.py is the ASGI app
(FastAPI) with the endpoints and metrics. docs/serving.md describes the design.
"""
