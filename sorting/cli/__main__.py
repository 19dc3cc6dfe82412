"""`python -m sorting.cli`: the `sorting` command."""
import sys

from sorting.cli import main

if __name__ == "__main__":
    sys.exit(main())
