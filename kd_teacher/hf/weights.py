"""Hugging Face tensors -> this rank's Megatron-Core GPT parameters (local and Transformer Engine layer specs).

Every entry of the model's state dict (this rank's pipeline stage, TP/EP shard) is filled from the checkpoint,
reading only the block of each Hugging Face tensor that the rank holds:

| Megatron-Core parameter | Hugging Face tensor(s) | this rank's block |
| --- | --- | --- |
| `embedding.word_embeddings`, `output_layer` | `embed_tokens`, `lm_head` (`embed_tokens` when tied) | vocabulary rows of the padded vocabulary; padding rows zero |
| `linear_qkv` weight / bias | `q_proj`, `k_proj`, `v_proj` | its query groups, laid out per group as [q heads of the group, k, v] |
| `linear_proj`, `linear_fc2` (also per expert) | `o_proj`, `down_proj` / `w2` | input columns |
| `linear_fc1` (also per expert) | `gate_proj` + `up_proj` / `w1` + `w3` | its rows of gate, then its rows of up |
| norms (`input_layernorm` or TE's `linear_qkv.layer_norm_weight`, `pre_mlp_layernorm` or `linear_fc1.layer_norm_weight`, `q/k_layernorm`, final), `router` | the norm, `gate` | whole |

Experts: SequentialMLP (`experts.local_experts.{j}.linear_fc*`) and TE's grouped GEMM (`experts.linear_fc*.weight{j}`);
local expert j of EP rank r is global expert r * (experts / EP) + j, split over the expert-TP group.

Before anything is read, the checkpoint's tensor table is compared with what config.json implies (names and
shapes, every layer and expert): a missing tensor, one of another shape, or one nothing here maps (an
architecture feature the mapping would drop) is an error naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_teacher.engine.model import ModelConfig
from kd_teacher.hf.config import FAMILIES
from kd_teacher.hf.safetensors_files import HFCheckpointError, SafetensorsFiles

# Tensors some checkpoints carry that describe nothing the model computes from its weights.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# ---- names and shapes config.json implies -------------------------------------------------------------------
def _layer_names(family: str, i: int) -> dict:
    p = f"model.layers.{i}"
    names = dict(
        input_norm=f"{p}.input_layernorm.weight",
        post_norm=f"{p}.post_attention_layernorm.weight",
        q=f"{p}.self_attn.q_proj", k=f"{p}.self_attn.k_proj", v=f"{p}.self_attn.v_proj",
        o=f"{p}.self_attn.o_proj.weight",
        q_norm=f"{p}.self_attn.q_norm.weight", k_norm=f"{p}.self_attn.k_norm.weight",
        gate=f"{p}.mlp.gate_proj.weight", up=f"{p}.mlp.up_proj.weight", down=f"{p}.mlp.down_proj.weight",
    )
    if FAMILIES[family].moe == "mixtral":
        names["router"] = f"{p}.block_sparse_moe.gate.weight"
        names["expert"] = lambda e: (f"{p}.block_sparse_moe.experts.{e}.w1.weight",
                                     f"{p}.block_sparse_moe.experts.{e}.w3.weight",
                                     f"{p}.block_sparse_moe.experts.{e}.w2.weight")
    else:
        names["router"] = f"{p}.mlp.gate.weight"
        names["expert"] = lambda e: (f"{p}.mlp.experts.{e}.gate_proj.weight", f"{p}.mlp.experts.{e}.up_proj.weight",
                                     f"{p}.mlp.experts.{e}.down_proj.weight")
    return names


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    if cfg.moe is None:
        return False
    freq = cfg.moe.layer_freq
    return bool(freq[i]) if isinstance(freq, list) else i % freq == 0


def head_dim(cfg: ModelConfig) -> int:
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def expected_shapes(cfg: ModelConfig, family: str) -> dict[str, tuple]:
    """Every Hugging Face tensor the model needs (all layers and experts) and its shape per config.json."""
    h, d = cfg.hidden_size, head_dim(cfg)
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.share_embeddings_and_output_weights:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        n = _layer_names(family, i)
        out.update({n["input_norm"]: (h,), n["post_norm"]: (h,), n["q"] + ".weight": (heads * d, h),
                    n["k"] + ".weight": (groups * d, h), n["v"] + ".weight": (groups * d, h),
                    n["o"]: (h, heads * d)})
        if cfg.add_qkv_bias:
            out.update({n["q"] + ".bias": (heads * d,), n["k"] + ".bias": (groups * d,), n["v"] + ".bias": (groups * d,)})
        if cfg.qk_layernorm:
            out.update({n["q_norm"]: (d,), n["k_norm"]: (d,)})
        if is_moe_layer(cfg, i):
            f = cfg.moe.ffn_hidden_size
            out[n["router"]] = (cfg.moe.num_experts, h)
            for e in range(cfg.moe.num_experts):
                gate, up, down = n["expert"](e)
                out.update({gate: (f, h), up: (f, h), down: (h, f)})
        else:
            f = cfg.ffn_hidden_size
            out.update({n["gate"]: (f, h), n["up"]: (f, h), n["down"]: (h, f)})
    return out


def check_checkpoint(files: SafetensorsFiles, cfg: ModelConfig, family: str) -> None:
    """Refuse a checkpoint whose tensor table is not exactly what config.json implies (names and shapes)."""
    want = expected_shapes(cfg, family)
    have = {name: e.shape for name, e in files.entries.items() if not _IGNORED.fullmatch(name)}
    if cfg.share_embeddings_and_output_weights:
        have.pop("lm_head.weight", None)  # some tied checkpoints store the same matrix twice
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(n for n in set(want) & set(have) if tuple(have[n]) != tuple(want[n]))
    problems = []
    if wrong:
        problems.append("shape does not match config.json: " + "; ".join(
            f"{n} is {list(have[n])} in {files.entries[n].file}, config.json implies {list(want[n])}" for n in wrong[:3]))
    if missing:
        problems.append(f"{len(missing)} tensor(s) config.json implies are missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) kd-teacher does not map ({family} as config.json describes it "
                        f"has no place for them), e.g. {extra[:3]}")
    if problems:
        raise HFCheckpointError(f"{files.directory}: " + " | ".join(problems))


# ---- this rank's block of each tensor ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shard:
    rank: int
    size: int

    def part(self, n: int) -> slice:
        step = n // self.size
        return slice(self.rank * step, (self.rank + 1) * step)


def _cols(files, name, shard):
    return files.read(name, cols=shard.part(files.entries[name].shape[1]))


def _gate_up(files, gate, up, shard):
    rows = shard.part(files.entries[gate].shape[0])
    return torch.cat([files.read(gate, rows=rows), files.read(up, rows=rows)])


def _vocab_rows(files, name, shard, vocab: int, padded: int):
    rows = shard.part(padded)
    block = files.read(name, rows=slice(rows.start, max(rows.start, min(rows.stop, vocab))))
    pad = rows.stop - rows.start - block.shape[0]
    return torch.cat([block, block.new_zeros((pad, *block.shape[1:]))]) if pad else block


def _qkv(files, names: tuple, shard, cfg: ModelConfig, suffix: str):
    """Megatron's fused layout: per query group, its q heads then its k and v head."""
    d = head_dim(cfg)
    groups = cfg.num_query_groups or cfg.num_attention_heads
    per_group = cfg.num_attention_heads // groups
    g = shard.part(groups)
    q = files.read(names[0] + suffix, rows=slice(g.start * per_group * d, g.stop * per_group * d))
    k = files.read(names[1] + suffix, rows=slice(g.start * d, g.stop * d))
    v = files.read(names[2] + suffix, rows=slice(g.start * d, g.stop * d))
    n = g.stop - g.start
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(n, per_group * d, *tail), k.reshape(n, d, *tail), v.reshape(n, d, *tail)], dim=1)
    return fused.reshape(-1, *tail)


_EXPERT = re.compile(r"mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))$")


def _reader(key: str, cfg: ModelConfig, family: str, layer_number: dict, shards: dict):
    """A function (files) -> this rank's tensor for Megatron-Core state-dict key `key`."""
    tp, etp = shards["tp"], shards["etp"]
    padded = cfg.padded_vocab_size
    if key == "embedding.word_embeddings.weight":
        return lambda f: _vocab_rows(f, "model.embed_tokens.weight", tp, cfg.vocab_size, padded)
    if key == "output_layer.weight":
        src = "model.embed_tokens.weight" if cfg.share_embeddings_and_output_weights else "lm_head.weight"
        return lambda f: _vocab_rows(f, src, tp, cfg.vocab_size, padded)
    if key == "decoder.final_layernorm.weight":
        return lambda f: f.read("model.norm.weight")
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
    if m is None:
        return None
    n = _layer_names(family, layer_number[int(m.group(1))])
    rest = m.group(2)
    simple = {
        "input_layernorm.weight": n["input_norm"], "self_attention.linear_qkv.layer_norm_weight": n["input_norm"],
        "pre_mlp_layernorm.weight": n["post_norm"], "mlp.linear_fc1.layer_norm_weight": n["post_norm"],
        "self_attention.q_layernorm.weight": n["q_norm"], "self_attention.k_layernorm.weight": n["k_norm"],
        "mlp.router.weight": n["router"],
    }
    if rest in simple:
        return lambda f: f.read(simple[rest])
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        suffix = "." + rest.rsplit(".", 1)[1]
        return lambda f: _qkv(f, (n["q"], n["k"], n["v"]), tp, cfg, suffix)
    if rest == "self_attention.linear_proj.weight":
        return lambda f: _cols(f, n["o"], tp)
    if rest == "mlp.linear_fc1.weight":
        return lambda f: _gate_up(f, n["gate"], n["up"], tp)
    if rest == "mlp.linear_fc2.weight":
        return lambda f: _cols(f, n["down"], tp)
    e = _EXPERT.fullmatch(rest)
    if e is not None:
        local, fc = (int(e.group(1)), e.group(2)) if e.group(1) is not None else (int(e.group(4)), e.group(3))
        gate, up, down = n["expert"](shards["expert_offset"] + local)
        if fc == "linear_fc1":
            return lambda f: _gate_up(f, gate, up, etp)
        return lambda f: _cols(f, down, etp)
    return None


def load_hf_weights(model: torch.nn.Module, directory: str | Path, cfg: ModelConfig, family: str) -> tuple[int, int]:
    """Fill every parameter of this rank's `model` (built from `cfg`) from the checkpoint in `directory`; returns
    (bytes this rank read, bytes of the whole checkpoint): under TP/EP a rank reads its slices, not the tensors.

    The checkpoint is checked against `cfg` first (`check_checkpoint`); a Megatron-Core parameter the mapping
    does not know is an error naming it, so no parameter keeps its initial values.
    """
    from megatron.core import parallel_state as mpu

    files = SafetensorsFiles(directory)
    check_checkpoint(files, cfg, family)
    experts_per_rank = cfg.moe.num_experts // cfg.expert_model_parallel_size if cfg.moe else 0
    shards = dict(
        tp=_Shard(mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()),
        etp=_Shard(mpu.get_expert_tensor_parallel_rank(), mpu.get_expert_tensor_parallel_world_size())
        if cfg.moe else None,
        expert_offset=mpu.get_expert_model_parallel_rank() * experts_per_rank,
    )
    decoder = getattr(model, "decoder", None)
    layer_number = {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)} if decoder is not None else {}
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if "_extra_state" not in k}
    readers = {key: _reader(key, cfg, family, layer_number, shards) for key in state}
    unknown = sorted(k for k, r in readers.items() if r is None)
    if unknown:
        raise HFCheckpointError(f"no Hugging Face tensor maps to Megatron-Core parameter(s) {unknown[:5]}")
    with torch.no_grad(), files.open():
        for key, read in readers.items():
            param = state[key]
            block = read(files)
            if tuple(block.shape) != tuple(param.shape):
                raise HFCheckpointError(
                    f"{key}: this rank's block of the checkpoint is {list(block.shape)}, the model's parameter "
                    f"is {list(param.shape)} (TP/EP layout or config mismatch)"
                )
            param.copy_(block.to(dtype=param.dtype))
    return files.bytes_read, files.total_bytes
