"""MLproject entry point `simulate` (see MLproject)."""

import sys

from epsstar.cli import main

if __name__ == "__main__":
    main(["simulate", *sys.argv[1:]])
