"""MLproject entry points `find_epsstar` and `main` (see MLproject)."""

import sys

from epsstar.cli import main

if __name__ == "__main__":
    main(["find", *sys.argv[1:]])
