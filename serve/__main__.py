"""`python -m serve [flags]`: the same as `tsjax serve [flags]`."""

import sys

from tsjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
