"""MLproject entry point `train` (see MLproject)."""

import sys

from epsstar.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
