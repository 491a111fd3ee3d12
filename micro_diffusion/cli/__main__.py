"""`python -m micro_diffusion.cli <command> ...`: the `micro-diffusion` command without the console script."""

from micro_diffusion.cli import main

main()
