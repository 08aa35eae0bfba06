"""``python -m sparsevd``: the same command as the ``sparsevd`` console script (see sparsevd.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
