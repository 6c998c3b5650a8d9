"""A Hugging Face checkpoint's `config.json` -> the `ModelConfig` of the same model in Megatron-Core.

Read as plain JSON, so the base install needs no `transformers`. Both spellings transformers has written are
understood: 4.x (`rope_theta`, `rope_scaling`, `num_experts`, `torch_dtype`) and 5.x (`rope_parameters`,
`num_local_experts`, `dtype`). Families: Llama 3.x (`llama`), Mistral (`mistral`), Qwen2/2.5 (`qwen2`), Qwen3
(`qwen3`), Qwen3-MoE (`qwen3_moe`), Mixtral (`mixtral`).

Anything in the config that would make Megatron-Core's model compute something else than the checkpoint's
model is refused by name (`UnsupportedModelError`): sliding-window attention, RoPE scalings Megatron-Core does
not implement, biases it has no place for, quantized weights, other activations. Nothing is silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kd_teacher.config import ConfigError, from_dict, to_dict
from kd_teacher.engine.model import ModelConfig


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture, or one of its options, has no exact Megatron-Core counterpart here."""


@dataclass(frozen=True)
class Family:
    """What a `model_type` means for the mapping, beyond the fields every family shares."""

    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2); o_proj never does here
    qk_norm: bool = False  # RMSNorm over each query/key head before RoPE (Qwen3)
    moe: Optional[str] = None  # "qwen3_moe" or "mixtral": where the router and experts live


FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
    "qwen3_moe": Family(qk_norm=True, moe="qwen3_moe"),
    "mixtral": Family(moe="mixtral"),
}
_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
# Megatron-Core's Llama 3 RoPE scaling fixes these three; checkpoints with others would rotate differently.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read_hf_config(path: str | Path) -> dict:
    """`config.json` of a checkpoint directory (or the file itself) as a dict."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return data


def family_of(hf: dict) -> str:
    """The config's `model_type`, refused unless it is one of `FAMILIES` (the error names both sides)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        arch = ", ".join(hf.get("architectures") or []) or "no architectures field"
        raise UnsupportedModelError(
            f"unknown architecture: model_type {model_type!r} ({arch}); kd-teacher maps "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return model_type


def model_config_from_hf(source: str | Path | dict, overrides: Optional[dict] = None) -> ModelConfig:
    """The `ModelConfig` of the checkpoint at `source` (a directory, its config.json, or the parsed dict).

    `overrides` are `ModelConfig` fields set on top (nested dicts for `precision:` and `moe:`; dotted
    command-line `key=value` strings become one with `kd_teacher.config.apply_overrides({}, items)`): the
    parallel layout, `layer_spec`, `precision.params_dtype`, `moe.token_dispatcher_type`, ...
    A MoE model with TP > 1 gets `sequence_parallel: true` unless told otherwise (Megatron-Core's MoE layer
    refuses TP without it in a training forward, which the consistency contract compares against).
    """
    hf = source if isinstance(source, dict) else read_hf_config(source)
    data = _merge(_model_fields(hf), overrides or {})
    if data.get("moe") and data.get("tensor_model_parallel_size", 1) > 1 and "sequence_parallel" not in (
        overrides or {}
    ):
        data["sequence_parallel"] = True
    try:
        return from_dict(ModelConfig, data, "model")
    except ValueError as e:  # ConfigError, or ModelConfig's own checks
        raise ConfigError(f"{e}") from None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        value = to_dict(value)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _model_fields(hf: dict) -> dict:
    name = family_of(hf)
    fam = FAMILIES[name]
    _refuse_unsupported(hf, name, fam)
    hidden = _int(hf, "hidden_size")
    heads = _int(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    data = dict(
        num_layers=_int(hf, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=_int(hf, "intermediate_size"),
        vocab_size=_int(hf, "vocab_size"),
        max_sequence_length=_int(hf, "max_position_embeddings"),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        qk_layernorm=fam.qk_norm,
        add_qkv_bias=fam.qkv_bias,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        precision={"params_dtype": _dtype(hf)},
    )
    if head_dim is not None and head_dim * heads != hidden:
        data["kv_channels"] = int(head_dim)
    data.update(_rope_fields(hf))
    if fam.moe:
        data["moe"] = _moe_fields(hf, fam.moe)
    return data


def _int(hf: dict, key: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.json: {key} is {value!r}, expected a positive integer")
    return value


def _dtype(hf: dict) -> str:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise UnsupportedModelError(f"config.json dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope theta, scaling dict) from either spelling: 5.x `rope_parameters`, 4.x `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()):
            raise UnsupportedModelError(f"per-layer-type RoPE parameters {sorted(params)} (interleaved attention "
                                        "types) are not supported")
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), scaling
    return float(hf.get("rope_theta", 10000.0)), dict(hf.get("rope_scaling") or {})


def _rope_fields(hf: dict) -> dict:
    theta, scaling = _rope(hf)
    out = {"rotary_base": int(theta) if theta.is_integer() else theta}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return out
    factor = scaling.get("factor")
    if kind == "linear":
        out["rotary_seq_len_interpolation_factor"] = float(factor)
        return out
    if kind == "llama3":
        off = {k: scaling.get(k) for k, v in _LLAMA3_ROPE_FIXED.items()
               if scaling.get(k) is None or not math.isclose(float(scaling[k]), v)}
        if off:
            raise UnsupportedModelError(
                f"rope_scaling llama3 with {off}: Megatron-Core's Llama 3 scaling fixes {_LLAMA3_ROPE_FIXED}"
            )
        out["rope_scaling_factor"] = float(factor)
        return out
    raise UnsupportedModelError(
        f"rope_scaling type {kind!r} ({scaling}) is not supported; supported: default, linear, llama3"
    )


def _moe_fields(hf: dict, kind: str) -> dict:
    num_experts = hf.get("num_experts", hf.get("num_local_experts"))
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"config.json: number of experts is {num_experts!r}")
    moe = dict(num_experts=num_experts, router_topk=_int(hf, "num_experts_per_tok"))
    if kind == "mixtral":
        # Mixtral renormalises the top-k of the full softmax: the softmax over the k chosen logits.
        moe.update(ffn_hidden_size=_int(hf, "intermediate_size"), router_pre_softmax=False)
        return moe
    moe.update(ffn_hidden_size=_int(hf, "moe_intermediate_size"),
               router_pre_softmax=not bool(hf.get("norm_topk_prob", False)))
    # Qwen3-MoE: layer i has experts unless it is in mlp_only_layers, and (i + 1) % decoder_sparse_step == 0.
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    layers = _int(hf, "num_hidden_layers")
    pattern = [0 if i in dense or (i + 1) % step else 1 for i in range(layers)]
    if not any(pattern):
        raise UnsupportedModelError("qwen3_moe config without any expert layer (mlp_only_layers / "
                                    "decoder_sparse_step): load it as a dense model")
    moe["layer_freq"] = 1 if all(pattern) else pattern
    return moe


def _refuse_unsupported(hf: dict, name: str, fam: Family) -> None:
    problems = []
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        problems.append(f"quantized weights (quantization_config, quant_method {method!r})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act {act!r} (only silu, as SwiGLU)")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", name in ("mistral", "mixtral"))
    if window is not None and uses_window:
        problems.append(f"sliding-window attention (sliding_window={window}); Megatron-Core's GPT attention here is "
                        "full causal attention")
    layer_types = set(hf.get("layer_types") or []) - {"full_attention"}
    if layer_types:
        problems.append(f"layer_types {sorted(layer_types)} (only full_attention)")
    if hf.get("attention_bias") and not fam.qkv_bias:
        problems.append("attention_bias: true (biases on q/k/v and o_proj; Megatron-Core has qkv biases only)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias: true (the MLP projections are bias-free here)")
    if hf.get("shared_expert_intermediate_size"):
        problems.append("shared experts (shared_expert_intermediate_size)")
    if problems:
        raise UnsupportedModelError(f"{name} checkpoint with unsupported option(s): " + "; ".join(problems))
