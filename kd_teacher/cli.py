"""`kd-teacher` console script: one entry point, one subcommand per concern.

Each subcommand lives in the module of its concern and exposes `register(subparsers)`, which adds its parser
and sets `func`. Adding a subcommand is one line in `_COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

_COMMANDS = [
    "kd_teacher.engine.consistency",  # kd-teacher consistency CONFIG
    "kd_teacher.engine.recipe_cli",  # kd-teacher recipe CONFIG [--against FINGERPRINT]
    "kd_teacher.offline.cli",  # kd-teacher dump CONFIG | verify DIR | inspect DIR
    "kd_teacher.serve",  # kd-teacher serve CONFIG (streaming teacher: shm or torch.distributed)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-teacher", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logging.getLogger("kd-teacher").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
