"""`python -m epsstar` is the `epsstar` command."""

from epsstar.cli import main

main()
