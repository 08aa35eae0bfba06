"""``sparsevd bench``: the benchmark suite of the README in a quick mode
(:mod:`sparsevd.benchmarks.suite`, imported when the command runs), its table printed and, with
``--out FILE``, its rows written as JSON.

Exit status: 0 on success, 1 when ``--out`` cannot be written, 2 for usage errors (``--device
cuda`` without CUDA included).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .._files import atomic_write_bytes, check_writable
from .args import positive_int

__all__ = ["add_parser", "command"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand and its options to ``sub`` (the subparsers of the ``sparsevd``
    parser); returns its parser."""
    be = sub.add_parser("bench", help="run the benchmark suite in a quick mode and print the ratios",
                        description="Run the benchmarks of the README in a quick mode on this "
                                    "machine and print their table: median times and the time "
                                    "ratios to dense and to torch.compile of the naive code.")
    be.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    be.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    be.add_argument("--out", default=None, metavar="FILE", help="also write the rows (JSON)")
    be.add_argument("--verbose", action="store_true", help="the benchmarks' own output too")
    return be


def command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``sparsevd bench`` with ``args`` parsed by ``parser`` (whose ``error`` reports
    ``--device cuda`` without CUDA, exit status 2); returns the exit status (0; 1: ``--out`` not
    writable or a full disk, the message on stderr)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but torch.cuda.is_available() is False")
    from ..benchmarks import suite

    threads = args.threads or torch.get_num_threads()
    print(f"sparsevd bench: quick suite on {args.device} ({threads} threads); a minute or two ...",
          flush=True)
    try:
        if args.out:
            check_writable(args.out, "--out", directory=False)
        rows = suite.run(args.device, args.threads, None, args.verbose)
        print(suite.ratio_table(rows))
        if args.out:  # after the table: a full disk loses the file, not the results
            atomic_write_bytes(args.out, (json.dumps(rows, indent=1) + "\n").encode())
    except OSError as e:  # --out not writable; a full disk: FileWriteError names the file
        print(f"sparsevd bench: {e}", file=sys.stderr)
        return 1
    return 0
