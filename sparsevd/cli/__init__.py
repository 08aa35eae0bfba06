"""The ``sparsevd`` command (console script and ``python -m sparsevd``), one module per
subcommand: :mod:`sparsevd.cli.train` (``sparsevd train``), :mod:`sparsevd.cli.deploy`
(``sparsevd deploy``, which parses its own options; imported only when it runs),
:mod:`sparsevd.cli.plot` (``sparsevd plot``), :mod:`sparsevd.cli.bench` (``sparsevd bench``);
their argparse types: :mod:`sparsevd.cli.args`.

The command line only parses arguments and prints: the work is the library's
(:func:`sparsevd.train.run`, :func:`sparsevd.deploy`, :func:`sparsevd.plots.plot_run`,
:mod:`sparsevd.benchmarks.suite`). Nothing in the library or the benchmarks imports this package.

Usage::

    sparsevd train --model lenet300 --dataset fashion-mnist --epochs 30 --json result.json
    python -m sparsevd train --dense --epochs 30
    sparsevd deploy ...        # see sparsevd deploy --help
    sparsevd plot runs/main    # redraw curves.png and masks.png
    sparsevd bench             # the benchmark suite, quick mode
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import bench, plot, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``sparsevd`` command: the subcommands ``train``, ``bench``,
    ``plot`` (each added by its module's ``add_parser``) and ``deploy`` (listed only: it parses its
    own options, :func:`sparsevd.cli.deploy.build_parser`). ``parser.train_parser`` is the
    ``train`` subparser, for errors that name it."""
    parser = argparse.ArgumentParser(
        prog="sparsevd",
        description="Sparse Variational Dropout (Molchanov, Ashukha, Vetrov, ICML 2017).")
    sub = parser.add_subparsers(dest="command", metavar="{train,deploy,plot,bench}")
    sub.required = True
    parser.train_parser = train.add_parser(sub)  # for errors that name the train subcommand
    bench.add_parser(sub)
    plot.add_parser(sub)
    sub.add_parser(
        "deploy", add_help=False,
        help="turn a trained checkpoint into a sparse inference model "
             "(sparsevd deploy --help for its options)")
    return parser


def _deploy(argv: Sequence[str]) -> int:
    """Run ``sparsevd deploy`` with ``argv`` (the arguments after ``deploy``): its module's
    ``main``; exit status 2 with a message when that module is missing."""
    try:
        deploy_cli = importlib.import_module("sparsevd.cli.deploy")
    except ModuleNotFoundError as e:
        if e.name != "sparsevd.cli.deploy":
            raise
        print("sparsevd deploy: not available in this version of sparsevd (the module "
              "sparsevd.cli.deploy is missing)", file=sys.stderr)
        return 2
    rc = deploy_cli.main(list(argv))
    return int(rc or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sparsevd`` command and of ``python -m sparsevd``.

    Args:
        argv: the arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success; 1 when the data cannot be found, the run diverged, a file
        cannot be read or written; 2 for usage errors (argparse exits with 2 itself) or a
        missing ``deploy`` implementation; 130 when interrupted (Ctrl-C).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "deploy":
        return _deploy(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        return train.command(parser, args, argv)
    if args.command == "bench":
        return bench.command(parser, args)
    if args.command == "plot":
        return plot.command(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2

