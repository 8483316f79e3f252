"""Files: run directories and checkpoints (checkpoint.py), output-folder ownership and atomic
writes (outdir.py), Hugging Face and GGUF conversion and export (hf.py), heads saved alone to ship
beside a pretrained model (heads_file.py), the SmolLM2 model we ship with (smollm2.py)."""
