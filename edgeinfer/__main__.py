"""`python -m edgeinfer`: the command line."""

from edgeinfer.cli import main

main()
