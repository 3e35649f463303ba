"""MLproject entry point `report` (see MLproject)."""

import sys

from epsstar.cli import main

if __name__ == "__main__":
    main(["report", *sys.argv[1:]])
