"""`python -m ditk ...` (e.g. `torchrun --nproc_per_node 8 -m ditk train ...`)."""

from .cli import main

main()
