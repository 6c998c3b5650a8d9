"""KD added to Megatron-LM's own `pretrain()`, from outside: what `python -m kd_teacher.megatron_lm` installs.

A Megatron-LM training script (`pretrain_gpt.py`) hands its `forward_step` to `megatron.training.pretrain`,
and its argument parser takes an `extra_args_provider`. Before the script runs, `install()` replaces, in the
modules the script imports them from:

- `pretrain` by a function of the same signature that wraps its `forward_step_func` argument with
  `wrap_forward_step(..., "megatron_args")` (KD built at the first micro-batch from `--kd-config`), whichever
  of Megatron-LM's signatures it has: `pretrain(train_valid_test_dataset_provider, model_provider, model_type,
  forward_step_func, ..., extra_args_provider=None, args_defaults={}, ...)` (core_r0.17 and earlier),
  `pretrain(cfg_container, train_valid_test_dataset_provider, model_provider, model_type, forward_step_func, ...)`
  (0.18) and `pretrain(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
  model_provider=None, ...)` (0.19, main);
- the parser's `extra_args_provider`, so that `--kd-config` / `--kd-override` are Megatron-LM arguments
  (printed with the others, saved in checkpoints): the `extra_args_provider` argument of that old `pretrain`,
  or of `megatron.training.arguments.parse_and_validate_args`, which parses before `pretrain` from 0.18 on.
  A provider the script passes itself (ModelOpt's `add_modelopt_args`) runs first; ours is added after it.

Arguments are bound by name against the real signature, so positional and keyword calls both work. A release
whose `pretrain` has no `forward_step_func`, or whose parser cannot be extended, is refused with its version
and the manual alternative.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from kd_teacher.hooks.forward_step import KDForwardStep, MegatronArgsForwardStep, add_kd_args, wrap_forward_step

log = logging.getLogger(__name__)

MANUAL = (
    "Add KD by hand instead (docs/megatron_lm.md, 'By hand'): in the training script, pass "
    "kd_teacher.hooks.add_kd_args as extra_args_provider to parse_and_validate_args (Megatron-LM 0.18 and later) "
    "or to pretrain (earlier releases), and wrap_forward_step(forward_step, \"megatron_args\") as pretrain's "
    "forward_step"
)


class LauncherError(RuntimeError):
    """This Megatron-LM cannot be given KD from outside; the message names its version and the manual way."""


@dataclass
class Installation:
    """What `install()` changed, and whether the script used it."""

    where: str  # megatron.training's location and megatron-core's version, for messages
    signature: str  # "pretrain(...)" as found
    pretrain_calls: int = 0
    wrapped: list = field(default_factory=list)  # (module, name) patched

    def check_used(self) -> None:
        if self.pretrain_calls == 0:
            raise LauncherError(
                f"the script finished without calling megatron.training.pretrain ({self.where}): no KD was added. "
                f"Does it train through another function? {MANUAL}")


def with_kd_args(provider: Optional[Callable]) -> Callable:
    """An `extra_args_provider` that runs `provider` (if any) and then adds the KD arguments once."""
    if getattr(provider, "_adds_kd_args", False):
        return provider

    def extra_args_provider(parser):
        if provider is not None:
            parser = provider(parser) or parser
        if "--kd-config" not in parser._option_string_actions:  # another provider of ours ran already
            add_kd_args(parser)
        return parser

    extra_args_provider._adds_kd_args = True
    return extra_args_provider


def with_kd(forward_step: Callable) -> Callable:
    if isinstance(forward_step, (MegatronArgsForwardStep, KDForwardStep)):  # the script wraps it itself
        return forward_step
    return wrap_forward_step(forward_step, "megatron_args")


def wrap_pretrain(pretrain: Callable, installation: Installation) -> Callable:
    signature = inspect.signature(pretrain)
    takes_provider = "extra_args_provider" in signature.parameters

    @functools.wraps(pretrain)
    def pretrain_with_kd(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["forward_step_func"] = with_kd(bound.arguments["forward_step_func"])
        if takes_provider:
            bound.arguments["extra_args_provider"] = with_kd_args(bound.arguments.get("extra_args_provider"))
        installation.pretrain_calls += 1
        return pretrain(*bound.args, **bound.kwargs)

    return pretrain_with_kd


def wrap_parse_and_validate_args(parse: Callable) -> Callable:
    signature = inspect.signature(parse)

    @functools.wraps(parse)
    def parse_and_validate_args(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["extra_args_provider"] = with_kd_args(bound.arguments.get("extra_args_provider"))
        return parse(*bound.args, **bound.kwargs)

    return parse_and_validate_args


def install(training=None, arguments=None) -> Installation:
    """Patch Megatron-LM's `pretrain` (in `megatron.training` and `megatron.training.training`) and, where it
    exists, `megatron.training.arguments.parse_and_validate_args`. Call it before the script imports them.
    `training` / `arguments`: those modules (default: imported from sys.path, as the script will)."""
    if training is None:
        try:
            import megatron.training.arguments as arguments
            import megatron.training.training as training
        except ImportError as e:
            raise LauncherError(
                f"cannot import Megatron-LM's megatron.training ({e}): run the launcher on a script of a "
                "Megatron-LM checkout (its directory goes first on sys.path, as with `python SCRIPT`)") from e
    where = _describe(training)
    pretrain = training.pretrain
    parameters = inspect.signature(pretrain).parameters
    installation = Installation(where=where, signature=f"pretrain{inspect.signature(pretrain)}")
    if "forward_step_func" not in parameters:
        raise LauncherError(f"{where}: its pretrain has no forward_step_func argument "
                            f"({installation.signature}), so KD cannot be added from outside. {MANUAL}")
    parse = getattr(arguments, "parse_and_validate_args", None)
    if "extra_args_provider" not in parameters:
        if parse is None or "extra_args_provider" not in inspect.signature(parse).parameters:
            raise LauncherError(
                f"{where}: neither its pretrain ({installation.signature}) nor "
                "megatron.training.arguments.parse_and_validate_args takes an extra_args_provider, so --kd-config "
                f"cannot be added to its arguments. {MANUAL}")
    if parse is not None:
        _replace(arguments, "parse_and_validate_args", wrap_parse_and_validate_args(parse), installation)
    wrapped = wrap_pretrain(pretrain, installation)
    _replace(training, "pretrain", wrapped, installation)
    package = _package_of(training)
    if package is not None and getattr(package, "pretrain", None) is pretrain:
        _replace(package, "pretrain", wrapped, installation)
    log.info("kd-teacher: KD added to %s", where)
    return installation


def _replace(module, name: str, value, installation: Installation) -> None:
    setattr(module, name, value)
    installation.wrapped.append((module.__name__, name))


def _package_of(module):
    import sys

    parent = module.__name__.rpartition(".")[0]
    return sys.modules.get(parent) if parent else None


def _describe(training) -> str:
    try:
        from megatron.core import package_info

        version = f"megatron-core {package_info.__version__}"
    except ImportError:
        version = "megatron-core of unknown version"
    return f"Megatron-LM at {getattr(training, '__file__', training.__name__)} ({version})"
