"""`python -m attnctl ...` (and `accelerate launch -m attnctl ...`): the `attnctl` command."""

from .cli import main

main()
