"""Training: the loss (loss.py), the trainer in named parts (trainer.py), evaluation
(evaluate.py), retrofitting heads onto a frozen model (retrofit.py), DDP/FSDP/compile applied
from outside the model (parallel.py), studies of head configurations (ablate.py) with their
quality measures (quality.py) and FLOP counts (flops.py)."""
