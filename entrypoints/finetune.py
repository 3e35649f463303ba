"""MLproject entry point `finetune` (see MLproject)."""

import sys

from epsstar.cli import main

if __name__ == "__main__":
    main(["finetune", *sys.argv[1:]])
