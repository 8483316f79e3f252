"""Training: the loss (loss.py), the trainer in named parts (trainer.py), evaluation
(evaluate.py), retrofitting heads onto a frozen model (retrofit.py), DDP/FSDP/compile applied
from outside the model (parallel.py) and FLOP counts (flops.py). Studies of head configurations
live apart, in multitoken.experiments."""
