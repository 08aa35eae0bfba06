"""``python -m sparsevd.cli``: the same command as ``sparsevd`` and ``python -m sparsevd``."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
