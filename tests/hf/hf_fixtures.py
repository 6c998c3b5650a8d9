"""Tiny Hugging Face checkpoints made by `transformers` in the test (no download), and what the workers run.

Every family is created from its own transformers config class with random weights (norms, biases and q/k
norms included, so that a swapped or misplaced tensor changes the numbers), saved as safetensors with a
word-level tokenizer of its vocabulary. The Hugging Face reference forward runs in the test process; kd-teacher
runs in `run_distributed` workers (module-level functions, importable by name).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 250
SEQ = 16
K = 8
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
# family -> (transformers config class, model class, config fields beyond BASE)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, head_dim=24)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    # Qwen3-MoE: one dense layer (mlp_only_layers) and no renormalised top-k (softmax over all experts first)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=32, norm_topk_prob=False,
        mlp_only_layers=[1])),
    # Mixtral: the top-k weights renormalised
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def make_checkpoint(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms (around 1) and biases
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model.save_pretrained(directory)
    write_tokenizer(directory, VOCAB)
    return directory


def write_tokenizer(directory: Path, vocab: int, prefix: str = "t") -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Path(directory).mkdir(parents=True, exist_ok=True)
    Tokenizer(WordLevel({f"{prefix}{i}": i for i in range(vocab)}, unk_token=f"{prefix}0")).save(
        str(Path(directory) / "tokenizer.json"))


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_reference(directory: Path, toks: torch.Tensor, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs and ids of Hugging Face's own fp32 forward of the checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(toks).logits.float(), dim=-1)
    return logp.topk(k, dim=-1)


# ---- run in workers ------------------------------------------------------------------------------------------
def score_hf(directory: str, toks: torch.Tensor, k: int = K, overrides=None, consistency: bool = False) -> dict:
    """Teacher mode of the checkpoint loaded by `TeacherEngine.from_hf` in this job's layout."""
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine

    engine = TeacherEngine.from_hf(directory, EngineConfig(k=k), overrides=overrides)
    p = engine.score(toks)
    out = dict(values=p.values, indices=p.indices, lse=p.lse, logp=p.log_probs(), header=p.header,
               repacking=engine.policy.allow_repacking)
    if consistency:
        from megatron.core import parallel_state as mpu

        teacher, train = engine.teacher_logits(toks), engine.training_logits(toks)
        out["teacher_equals_training"] = (teacher is None and not mpu.is_pipeline_last_stage()) or (
            torch.equal(teacher.view(torch.int32), train.view(torch.int32)))
    return out


def bytes_read(directory: str) -> tuple[int, int]:
    """(bytes this rank read, the checkpoint's bytes) when it loads `directory` in this job's layout."""
    from kd_teacher.hf.load import build_unfilled_hf_model
    from kd_teacher.hf.weights import load_hf_weights

    model, cfg, family = build_unfilled_hf_model(directory)
    return load_hf_weights(model, directory, cfg, family)


def import_hf(directory: str, out: str, *extra: str) -> int:
    """`kd-teacher import-hf DIRECTORY --out OUT` on every rank of this job (the conversion is collective)."""
    from kd_teacher.cli import main

    return main(["import-hf", directory, "--out", out, *extra])


def imported_equals_direct(directory: str, teacher_yaml: str, toks: torch.Tensor, overrides: list) -> dict:
    """The imported teacher (its YAML, as `kd-teacher dump/serve` build it) and `from_hf` of the checkpoint,
    both in this job's layout: their payloads."""
    from kd_teacher.engine.engine import TeacherEngine
    from kd_teacher.engine.loading import build_engine, load_teacher_config

    cfg = load_teacher_config(teacher_yaml, overrides)
    imported = build_engine(cfg)
    direct = TeacherEngine.from_hf(directory, cfg.engine)
    a, b = imported.score(toks), direct.score(toks)
    return dict(imported=(a.values, a.indices, a.lse), direct=(b.values, b.indices, b.lse), headers=(a.header, b.header),
                checkpoint=cfg.checkpoint, hf_checkpoint=cfg.hf_checkpoint)


def dump_and_hook(teacher_yaml: str, toks: torch.Tensor, dump_dir: str, student_tokenizers: dict) -> dict:
    """Dump `toks` with the imported teacher (jsonl source), then build the training hook over that dump with
    each student tokenizer: the manifest's tokenizer identity, and per student None or the hook's error."""
    import json

    from kd_teacher.config import from_dict, load_yaml
    from kd_teacher.hooks import wrap_forward_step
    from kd_teacher.offline.format import load_manifest
    from kd_teacher.offline.writer import DumpConfig, run_dump
    from megatron.core import parallel_state as mpu

    rows = Path(dump_dir).with_suffix(".jsonl")
    if mpu.get_data_parallel_rank() == 0 and torch.distributed.get_rank() == 0:
        rows.write_text("".join(json.dumps(r.tolist()) + "\n" for r in toks))
    torch.distributed.barrier()
    cfg = from_dict(DumpConfig, {"teacher": load_yaml(teacher_yaml), "data": {"kind": "jsonl", "path": str(rows)},
                                 "output": {"dir": dump_dir, "progress": False}})
    run_dump(cfg)
    refusals = {}
    for name, tokenizer in student_tokenizers.items():
        kd = {"source": "offline", "k": cfg.teacher.engine.k, "offline": {"dir": dump_dir}, "tokenizer": tokenizer}
        try:
            wrap_forward_step(lambda data_iterator, model: None, kd)
            refusals[name] = None
        except ValueError as e:
            refusals[name] = str(e)
    return dict(manifest_tokenizer=load_manifest(dump_dir).tokenizer_identity, refusals=refusals)
