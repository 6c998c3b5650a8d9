"""`kd-teacher` console script: one entry point, one subcommand per concern.

Each subcommand lives in the module of its concern and exposes `register(subparsers)`, which adds its parser
and sets `func`. Adding a subcommand is one line in `_COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

_COMMANDS = [
    "kd_teacher.engine.consistency",  # kd-teacher consistency CONFIG
    "kd_teacher.engine.recipe_cli",  # kd-teacher recipe CONFIG [--against FINGERPRINT]
    "kd_teacher.offline.cli",  # kd-teacher dump CONFIG | verify DIR | inspect DIR
    "kd_teacher.serve",  # kd-teacher serve CONFIG (streaming teacher: shm or torch.distributed)
    "kd_teacher.hf.cli",  # kd-teacher import-hf PATH --out DIR (a Hugging Face checkpoint as a teacher)
]


_VERBOSE_HELP = "debug logging, tracebacks of errors, and the third-party warnings hidden by default"

# Warnings that every run prints on a machine without Transformer Engine or Apex, and Megatron-Core's notes on
# its own settings: nothing a kd-teacher user can or needs to act on. Hidden unless --verbose; every other
# warning is shown. (message regex, module regex of the code that warns)
_HARMLESS_WARNINGS = [
    (r"Transformer Engine and Apex are not installed", r"megatron\."),
    (r"Apex is not installed", r"megatron\."),
    (r"full scope is deprecated", r"megatron\."),
    (r"When using async grad allreduce it is recommended to set the environment variable "
     r"CUDA_DEVICE_MAX_CONNECTIONS", r"megatron\."),
]
# Megatron-Core logs what it detected on import at INFO ("Using Megatron-FSDP without Transformer Engine"):
# only its warnings and errors are shown unless --verbose.
_CHATTY_LOGGERS = ["megatron"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-teacher", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():  # also after the subcommand: `kd-teacher dump CONFIG --verbose`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    return parser


def quiet_third_party(verbose: bool) -> None:
    """Hide the known harmless third-party warnings and import-time notes (see above), unless `verbose`."""
    if verbose:
        return
    for message, module in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party(any(a in ("-v", "--verbose") for a in argv))  # before any command imports Megatron-Core
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("kd-teacher")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # The message is for the user; the traceback for whoever debugs it (shown with --verbose).
        log.error("%s", e)
        log.debug("where it was raised:", exc_info=True)
        if not args.verbose:
            log.error("(run with --verbose for the traceback)")
        return 2


if __name__ == "__main__":
    sys.exit(main())
