"""``sparsevd plot DIR``: redraw curves.png and masks.png of a run of ``sparsevd train --out DIR``
(:func:`sparsevd.plots.plot_run`).

Exit status: 0 on success, 1 when the run's files cannot be read or the images cannot be written,
2 for usage errors.
"""
from __future__ import annotations

import argparse
import sys

from ..plots import plot_run

__all__ = ["add_parser", "command"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``plot`` subcommand to ``sub`` (the subparsers of the ``sparsevd`` parser); returns
    its parser."""
    pl = sub.add_parser("plot", help="redraw curves.png and masks.png of a training run",
                        description="Redraw curves.png (test accuracy, compression, KL/N per "
                                    "epoch) and masks.png (kept input pixels and weights) of a "
                                    "run of `sparsevd train --out DIR`.")
    pl.add_argument("run_dir", metavar="DIR", help="the --out directory of a training run")
    return pl


def command(args: argparse.Namespace) -> int:
    """Run ``sparsevd plot`` with ``args`` (``run_dir``); prints "wrote PATH" per image and returns
    the exit status (0; 1: a file unreadable or unwritable, the message on stderr)."""
    try:
        for path in plot_run(args.run_dir):
            print(f"wrote {path}")
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"sparsevd plot: {e}", file=sys.stderr)
        return 1
    return 0
