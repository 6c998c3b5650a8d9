"""The teacher's precision recipe: derived from the training `TransformerConfig`, fingerprinted, and turned
into a serving policy that the engine enforces.

Data flow: `PrecisionRecipe.from_transformer_config(config)` -> `fingerprint()` (goes into every payload
header and dump manifest) -> `serving_policy(recipe)` (what the engine may do with requests) ->
`require_fp8_support(recipe, model)` (refuses FP8 that would silently not happen) -> on the student side,
`check_recipe(payload_fingerprint, own_recipe)` (refuses a payload made under another recipe).

The policy per recipe, from the measurements in docs/measured_facts.md section 1 (H100, TE 2.20.2, megatron-core
0.19.2) and docs/streaming.md (repacking):

| recipe | a sequence's output depends on its micro-batch? | `engine.repacking` default | allowed |
| --- | --- | --- | --- |
| bf16 / fp16 / fp32 | no batch-wide term, but kernels are chosen by shape (below) | `off`; `proven` with a table | off, proven, any |
| FP8 blockwise, MXFP8 | no batch-wide scale (one per block of a row); kernels by shape | `off`; `proven` with a table | off, proven, any |
| FP8 tensorwise (current scaling) | yes (one amax over the whole activation tensor) | `off` | off only |
| FP8 delayed scaling | measured: yes (batch of 1 vs row 0 of batch of 2 differ) | `off`; scales frozen from the checkpoint | off only |
| any recipe, MoE model | yes (routing, capacity: `engine.moe_policy`) | `off` | off only |

Repacking (several requests' sequences in one forward) is an optimisation; "exactly as given" is always safe.
No recipe is batch-invariant by construction: cuBLAS (oneDNN on the CPU) choose GEMM kernels by shape, and
kernels reduce in different orders (H200, 2026-12-04: rows of 128-token sequences differed when repacked, >= 512
tokens bitwise equal; this 2-core CPU, fp32: equal-length rows equal, right-padded rows differ). So
`engine.repacking` is `off` (each request as given; the default, on the CPU too, where tests opt in), `proven`
(only into forward shapes that `engine.invariance_table`, a benchmarks/batch_invariance.py table of this
machine, proves bitwise equal to scoring alone: `engine.invariance`; the default when a table is given) or
`any` (an opt-in, logged as a warning). Sequence parallelism's padding to a multiple of TP holds in every mode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from kd_teacher.dtypes import name_of

log = logging.getLogger(__name__)

FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# FP8 recipes with no batch-wide term (a scale per block of a row): repacking may be proven, never assumed.
_BATCH_INVARIANT_FP8 = ("blockwise", "mxfp8")


class RecipeMismatchError(ValueError):
    """The payload's precision recipe is not the one this run trains under."""


class FP8UnavailableError(RuntimeError):
    """FP8 was requested where it cannot run (no Transformer Engine, no capable GPU, no TE layers)."""


# ---- the recipe ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionRecipe:
    """Everything that decides the numerics of a forward pass, and nothing that does not.

    Backward-only settings (`fp8_wgrad`) and settings that only shape scale updates during training
    (`tp_only_amax_red`) are left out: they do not change what a teacher forward computes, and recording
    them would make a teacher and a student with the same forward look different.

    The library versions ride along for the record (a dump's manifest keeps them) but are not part of the
    recipe: they are not compared and not in the fingerprint. A source checkout's version carries the VCS
    hash of whatever repository it sits in, so a fingerprint with it would refuse a dump after any commit;
    a version difference is a warning (`version_differences`), recorded without the local "+..." suffix.
    """

    params_dtype: str
    fp8: Optional[str] = None
    fp8_recipe: Optional[str] = None
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    fp8_param: bool = False
    fp8_dot_product_attention: bool = False
    fp8_multi_head_attention: bool = False
    fp8_output_proj: bool = False
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 0
    num_layers_at_end_in_bf16: int = 0
    te_version: Optional[str] = field(default=None, compare=False)
    mcore_version: Optional[str] = field(default=None, compare=False)

    @classmethod
    def from_transformer_config(cls, config) -> "PrecisionRecipe":
        """Read the recipe off a Megatron-Core `TransformerConfig` (the training run's own)."""
        dtype = name_of(config.params_dtype, "params_dtype")
        fp8 = getattr(config, "fp8", None)
        if not fp8:
            return cls(params_dtype=dtype, mcore_version=_mcore_version())
        recipe = getattr(config, "fp8_recipe", None) or "delayed"
        recipe = str(getattr(recipe, "value", recipe))  # Fp8Recipe enum or plain string
        delayed = recipe == "delayed"
        bf16_ends = bool(getattr(config, "first_last_layers_bf16", False))
        return cls(
            params_dtype=dtype,
            fp8=str(fp8),
            fp8_recipe=recipe,
            # margin / amax history only shape the delayed-scaling recipe; recording them for the others
            # would make two identical runs look different.
            fp8_margin=int(config.fp8_margin) if delayed else 0,
            fp8_amax_history_len=int(config.fp8_amax_history_len) if delayed else 1,
            fp8_amax_compute_algo=str(config.fp8_amax_compute_algo) if delayed else "most_recent",
            fp8_param=bool(getattr(config, "fp8_param", False)),
            fp8_dot_product_attention=bool(getattr(config, "fp8_dot_product_attention", False)),
            fp8_multi_head_attention=bool(getattr(config, "fp8_multi_head_attention", False)),
            fp8_output_proj=bool(getattr(config, "fp8_output_proj", False)),  # megatron-core >= 0.19
            first_last_layers_bf16=bf16_ends,
            num_layers_at_start_in_bf16=int(getattr(config, "num_layers_at_start_in_bf16", 0) or 0) if bf16_ends else 0,
            num_layers_at_end_in_bf16=int(getattr(config, "num_layers_at_end_in_bf16", 0) or 0) if bf16_ends else 0,
            te_version=_te_version(),
            mcore_version=_mcore_version(),
        )

    @property
    def name(self) -> str:
        return f"fp8-{self.fp8_recipe}" if self.fp8 else self.params_dtype

    @property
    def batch_invariant(self) -> bool:
        """No batch-wide term (scale, amax) in the recipe: a sequence's outputs depend on the rest of its
        micro-batch only through kernel choice by shape, which a measured table can rule out (module doc)."""
        return not self.fp8 or self.fp8_recipe in _BATCH_INVARIANT_FP8

    @property
    def delayed_scaling(self) -> bool:
        return bool(self.fp8) and self.fp8_recipe == "delayed"

    def describe(self) -> str:
        """The recipe in words, for error messages and reports."""
        if not self.fp8:
            text = f"{self.params_dtype} (no FP8)"
        else:
            kind = {
                "delayed": "FP8 delayed scaling",
                "tensorwise": "FP8 tensorwise (per-tensor current) scaling",
                "blockwise": "FP8 blockwise scaling",
                "mxfp8": "MXFP8 block scaling",
            }.get(self.fp8_recipe, f"FP8 recipe {self.fp8_recipe}")
            details = [f"format {self.fp8}"]
            if self.delayed_scaling:
                details.append(f"margin {self.fp8_margin}, amax history {self.fp8_amax_history_len} "
                               f"({self.fp8_amax_compute_algo})")
            if self.fp8_param:
                details.append("FP8 parameters")
            if self.fp8_dot_product_attention or self.fp8_multi_head_attention:
                details.append("FP8 attention")
            if self.fp8_output_proj:
                details.append("FP8 output projection")
            if self.first_last_layers_bf16:
                details.append(f"first {self.num_layers_at_start_in_bf16} / last {self.num_layers_at_end_in_bf16} "
                               "layers in bf16")
            text = f"{kind} ({', '.join(details)}), parameters {self.params_dtype}"
        versions = [f"Transformer Engine {self.te_version}" if self.te_version else None,
                    f"megatron-core {self.mcore_version}" if self.mcore_version else None]
        versions = [v for v in versions if v]
        return text + (f", {', '.join(versions)}" if versions else "")

    # ---- fingerprint --------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """`<name>:<hash>|<field=value;...>`: a stable hash of the recipe's fields (not the library versions),
        readable without a lookup table.

        The fields ride along so that a receiver can say in words which recipe a payload was made under
        (and how it differs from its own) even when it has never seen that recipe.
        """
        fields = ";".join(f"{k}={_render(v)}" for k, v in sorted(_numerics(self).items()))
        return f"{self.name}:{_digest(self)}|{fields}"

    @classmethod
    def from_fingerprint(cls, fingerprint: str) -> Optional["PrecisionRecipe"]:
        """The recipe a fingerprint describes; None when it is not one of ours or does not hash to itself."""
        try:
            head, fields = fingerprint.split("|", 1)
            digest = head.rsplit(":", 1)[1]
            types = {f.name: f.type for f in dataclasses.fields(cls)}
            values = {}
            for item in fields.split(";"):
                key, raw = item.split("=", 1)
                values[key] = _parse(raw, types[key])
            recipe = cls(**values)
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return recipe if _digest(recipe) == digest else None


def _numerics(recipe: PrecisionRecipe) -> dict:
    """The fields that decide the numbers (every field but the recorded library versions)."""
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.compare}


def _digest(recipe: PrecisionRecipe) -> str:
    blob = json.dumps(_numerics(recipe), sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def _render(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(raw: str, tp: str):
    # Field annotations are strings under `from __future__ import annotations`.
    if raw == "none" and tp.startswith("Optional"):
        return None
    if tp == "bool":
        if raw not in ("true", "false"):
            raise ValueError(raw)
        return raw == "true"
    if tp == "int":
        return int(raw)
    if any(sep in raw for sep in ";|"):
        raise ValueError(raw)
    return raw


def public_version(version: Optional[str]) -> Optional[str]:
    """A version without its local part: "0.19.1+1f415a5" (a source checkout's VCS hash) -> "0.19.1"."""
    return None if version is None else version.split("+", 1)[0]


def _te_version() -> Optional[str]:
    try:
        import transformer_engine

        return public_version(str(transformer_engine.__version__))
    except Exception:  # noqa: BLE001 - TE absent or broken: no version to record
        return None


def _mcore_version() -> Optional[str]:
    try:
        from megatron.core import package_info

        return public_version(str(package_info.__version__))
    except Exception:  # noqa: BLE001
        return None


_VERSION_NAMES = {"mcore_version": "megatron-core", "te_version": "Transformer Engine"}


def version_differences(recorded: dict) -> list[str]:
    """Library versions in a recorded recipe (a dump manifest's `recipe`) that differ from this process's,
    each as "megatron-core 0.19.1 (here 0.20.0)". Differences in the local "+..." part do not count."""
    here = {"mcore_version": _mcore_version(), "te_version": _te_version()}
    out = []
    for key, name in _VERSION_NAMES.items():
        then, now = public_version(recorded.get(key)), here[key]
        if then is not None and now is not None and then != now:
            out.append(f"{name} {then} (here {now})")
    return out


# ---- the student side: refuse a payload made under another recipe ----------------------------------------------
def check_recipe(
    payload_fingerprint: str, expected: Union[str, PrecisionRecipe], *, allow_mismatch: bool = False
) -> None:
    """Refuse a payload made under another precision recipe than this run's (unless told to accept it).

    `expected` is this run's recipe (or its fingerprint). The error names both recipes in words and the
    fields that differ.
    """
    expected_fp = expected.fingerprint() if isinstance(expected, PrecisionRecipe) else expected
    if payload_fingerprint == expected_fp:
        return
    message = recipe_mismatch(payload_fingerprint, expected)
    if allow_mismatch:
        log.warning("accepting a precision recipe mismatch (allow_recipe_mismatch): %s", message)
        return
    raise RecipeMismatchError(message + ". " + RECIPE_REMEDY)


RECIPE_REMEDY = ("Serve the teacher under the student's recipe (the teacher config's model.precision settings "
                 "named above; for a bf16 Megatron-LM student see configs/teacher_megatron_lm_bf16.yaml), or set "
                 "kd.allow_recipe_mismatch: true to accept it deliberately")


def recipe_mismatch(payload_fingerprint: str, expected: Union[str, PrecisionRecipe]) -> str:
    """Two recipes in words (`payload_fingerprint`: the teacher's; `expected`: this run's) and how they differ."""
    expected_fp = expected.fingerprint() if isinstance(expected, PrecisionRecipe) else expected
    theirs = PrecisionRecipe.from_fingerprint(payload_fingerprint)
    ours = expected if isinstance(expected, PrecisionRecipe) else PrecisionRecipe.from_fingerprint(expected_fp)
    message = (
        f"the teacher's logits were computed under {_words(theirs, payload_fingerprint)}, but this run "
        f"trains under {_words(ours, expected_fp)}"
    )
    if theirs is not None and ours is not None:
        message += f"; they differ in {recipe_differences(theirs, ours)}"
        settings = teacher_settings_for(ours, theirs)
        if settings:
            message += f"; to serve this run, set {', '.join(settings)} in the teacher config"
    return message


def recipe_differences(a: PrecisionRecipe, b: PrecisionRecipe) -> str:
    diffs = [
        f"{name} ({_render(value)} vs {_render(getattr(b, name))})"
        for name, value in _numerics(a).items()
        if value != getattr(b, name)
    ]
    return ", ".join(diffs) if diffs else "nothing but the fingerprint format"


# Recipe fields a teacher config sets as `model.precision.<field>` (kd_teacher.engine.model.PrecisionConfig);
# the others follow from them or from the model's layer spec.
_TEACHER_SETTINGS = ("params_dtype", "fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len",
                     "fp8_amax_compute_algo", "fp8_param", "first_last_layers_bf16", "num_layers_at_start_in_bf16",
                     "num_layers_at_end_in_bf16")


def teacher_settings_for(wanted: PrecisionRecipe, served: PrecisionRecipe) -> list[str]:
    """The teacher-config lines (`model.precision.params_dtype: bfloat16`, ...) that make `served` `wanted`."""
    return [f"model.precision.{name}: {_yaml(getattr(wanted, name))}"
            for name in _TEACHER_SETTINGS if getattr(wanted, name) != getattr(served, name)]


def _yaml(value) -> str:
    return "null" if value is None else _render(value)


def _words(recipe: Optional[PrecisionRecipe], fingerprint: str) -> str:
    if recipe is not None:
        return recipe.describe()
    if not fingerprint:
        return "an unrecorded precision recipe (empty fingerprint)"
    return f"an unreadable precision recipe (fingerprint {fingerprint!r})"


# ---- the engine side: serving policy and FP8 availability ------------------------------------------------------
REPACKING_MODES = ("off", "proven", "any")


@dataclass(frozen=True)
class ServingPolicy:
    """What the engine may do with requests under a recipe."""

    repacking: str  # one of REPACKING_MODES (the module doc)
    frozen_scales: bool  # delayed scaling: scales come from the checkpoint and teacher passes never change them
    reason: str

    @property
    def allow_repacking(self) -> bool:
        """Sequences of different requests may share a forward (in proven shapes only, under `proven`)."""
        return self.repacking != "off"

    def describe(self) -> str:
        what = {"off": "micro-batches exactly as given", "proven": "repacking into proven shapes only",
                "any": "repacking into any shape (opt-in)"}[self.repacking]
        return f"{what}{', scales frozen from the checkpoint' if self.frozen_scales else ''} ({self.reason})"


def serving_policy(recipe: PrecisionRecipe, repacking: Optional[str] = None, *,
                   model_batch_dependence: Optional[str] = None, invariance_table: Optional[str] = None) -> ServingPolicy:
    """The policy for `recipe` (the module doc's table). `repacking`: the engine config's `engine.repacking`
    (None: `proven` when `invariance_table` is given, else `off`).

    `model_batch_dependence`: why the model itself (not the recipe) makes a sequence's outputs depend on its
    micro-batch, e.g. a MoE layer (`kd_teacher.engine.moe_policy`); such a model never repacks either."""
    if repacking is not None and repacking not in REPACKING_MODES:
        raise ValueError(f"engine.repacking={repacking!r} is not one of {', '.join(REPACKING_MODES)}")
    never = (f"{recipe.name}, {model_batch_dependence}" if model_batch_dependence
             else f"{recipe.name}: one amax over the whole activation tensor (a batch-wide scale)"
             if recipe.fp8 and recipe.fp8_recipe == "tensorwise"
             else f"{recipe.name}: outputs measured to depend on the micro-batch composition"
             if not recipe.batch_invariant else None)
    asked = repacking if repacking is not None else ("proven" if invariance_table else None)
    if never is not None:
        if asked in ("proven", "any"):
            how = (f"engine.repacking={asked}" if repacking is not None
                   else f"engine.invariance_table={invariance_table}")
            raise ValueError(f"{how} with {never}: a sequence's outputs depend on the whole micro-batch, so "
                             "requests must run exactly as given (engine.repacking: off)")
        return ServingPolicy("off", recipe.delayed_scaling, f"{never}; each student micro-batch runs exactly as given")
    mode = asked or "off"
    if mode == "proven" and not invariance_table:
        raise ValueError("engine.repacking=proven needs engine.invariance_table: PATH (a table that "
                         "benchmarks/batch_invariance.py --config TEACHER.yaml --out PATH measures on this machine)")
    reason = {"off": f"{recipe.name}: kernels are chosen by shape, so a repacked sequence may differ from its own "
                     "micro-batch; set engine.invariance_table to pack into measured shapes",
              "proven": f"{recipe.name}: packed only into forward shapes {invariance_table} proves bitwise equal",
              "any": f"{recipe.name}: engine.repacking=any, payloads may differ in the last bits"}[mode]
    if mode == "any":
        log.warning("engine.repacking=any: requests are packed into forwards of any shape; under %s a sequence's "
                    "served top-k may then differ in the last bits from its own micro-batch's (kernels are chosen "
                    "by shape). Use engine.invariance_table for packing that is proven equal.", recipe.name)
    return ServingPolicy(mode, recipe.delayed_scaling, reason)


# Minimum device capability, CUDA version and Transformer Engine version per recipe, after TE 2.20's own
# checks (transformer_engine/pytorch/quantization.py) and megatron-core's `get_fp8_recipe` version gates.
_RECIPE_NEEDS = {
    "delayed": dict(capability=(8, 9), te="2.1.0"),
    "tensorwise": dict(capability=(8, 9), te="2.2.0"),
    "blockwise": dict(capability=(9, 0), cuda=(12, 9), te="2.3.0"),
    "mxfp8": dict(capability=(10, 0), below=(12, 0), te="2.1.0"),
}


def fp8_support_problems(
    recipe: PrecisionRecipe,
    *,
    te_version: Optional[str],
    capability: Optional[tuple[int, int]],
    cuda_version: Optional[str],
) -> list[str]:
    """What keeps `recipe` from running in this environment (empty: nothing). Pure: facts in, words out."""
    if not recipe.fp8:
        return []
    if recipe.fp8_recipe not in _RECIPE_NEEDS:
        return [f"unknown FP8 recipe {recipe.fp8_recipe!r} (known: {', '.join(FP8_RECIPES)})"]
    needs = _RECIPE_NEEDS[recipe.fp8_recipe]
    problems = []
    if te_version is None:
        problems.append("Transformer Engine is not installed (pip install transformer-engine[pytorch] on a CUDA "
                        "machine); without it Megatron-Core silently runs the FP8 layers in high precision")
    elif _version_tuple(te_version) < _version_tuple(needs["te"]):
        problems.append(f"Transformer Engine {te_version} is too old: {recipe.name} needs >= {needs['te']}")
    if capability is None:
        problems.append("no CUDA GPU is visible; FP8 needs one")
        return problems
    cap = f"{capability[0]}.{capability[1]}"
    if tuple(capability) < needs["capability"]:
        want = f"{needs['capability'][0]}.{needs['capability'][1]}"
        problems.append(f"{recipe.name} needs a GPU of compute capability >= {want}; this one is {cap}")
    if "below" in needs and tuple(capability) >= needs["below"]:
        problems.append(f"{recipe.name} is not supported by Transformer Engine on compute capability {cap}")
    if "cuda" in needs:
        want = needs["cuda"]
        if cuda_version is None or _version_tuple(cuda_version)[:2] < want:
            problems.append(f"{recipe.name} needs CUDA >= {want[0]}.{want[1]}; torch was built with CUDA {cuda_version}")
    return problems


def _version_tuple(version: str) -> tuple:
    out = []
    for part in version.replace("+", ".").split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def model_fp8_problems(recipe: PrecisionRecipe, model: torch.nn.Module) -> list[str]:
    """FP8 only happens in Transformer Engine layers: a model without them would run in high precision."""
    if not recipe.fp8 or has_te_layers(model):
        return []
    return [f"the model has no Transformer Engine layers (layer_spec: local), so {recipe.name} would silently "
            f"run in {recipe.params_dtype}; use layer_spec: transformer_engine"]


def has_te_layers(model: torch.nn.Module) -> bool:
    return any(
        cls.__module__.startswith("transformer_engine") for m in model.modules() for cls in type(m).__mro__
    )


def require_fp8_support(recipe: PrecisionRecipe, model: Optional[torch.nn.Module] = None) -> None:
    """Raise `FP8UnavailableError` naming everything missing for `recipe` here (no-op without FP8)."""
    if not recipe.fp8:
        return
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    problems = fp8_support_problems(
        recipe, te_version=_te_version(), capability=capability, cuda_version=torch.version.cuda
    )
    if not problems:
        te_reason = _te_recipe_check(recipe)
        if te_reason:
            problems.append(f"Transformer Engine says: {te_reason}")
    if not problems and model is not None:
        problems = model_fp8_problems(recipe, model)
    if problems:
        raise FP8UnavailableError(f"cannot run the teacher under {recipe.describe()}: " + "; ".join(problems))


def _te_recipe_check(recipe: PrecisionRecipe) -> str:
    """Transformer Engine's own verdict for this device ('' = supported), where TE exposes one."""
    try:
        try:
            from transformer_engine.pytorch import quantization as q  # TE >= 2.8
        except ImportError:
            from transformer_engine.pytorch import fp8 as q
        check = {
            "delayed": "check_fp8_support",
            "tensorwise": "check_fp8_support",
            "blockwise": "check_fp8_block_scaling_support",
            "mxfp8": "check_mxfp8_support",
        }[recipe.fp8_recipe]
        ok, reason = getattr(q, check)()
    except Exception as e:  # noqa: BLE001 - an old TE without the check: our own table above decided
        log.debug("Transformer Engine recipe check unavailable: %s", e)
        return ""
    return "" if ok else (reason or "recipe not supported on this device")
