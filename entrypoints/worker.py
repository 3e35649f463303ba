"""MLproject entry point `worker` (see MLproject)."""

import sys

from epsstar.cli import main

if __name__ == "__main__":
    main(["worker", *sys.argv[1:]])
