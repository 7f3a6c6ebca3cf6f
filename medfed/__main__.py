"""`python -m medfed` runs the command line."""

from medfed.cli.main import main

main()
