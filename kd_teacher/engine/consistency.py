"""The consistency contract, checked: teacher mode against the training-path forward, same micro-batches.

`check_consistency(engine, batches)` runs each micro-batch twice, through the training path (train mode,
dropout off, grad enabled) and through teacher mode, and reports per batch: bitwise equality of the logits,
max |logit diff|, max |log-prob diff| (full-vocabulary log-softmax at the engine's temperature), agreement of
the top-k ids, and whether the served payload equals the top-k of the training-path logits bit for bit.
All reductions run over the TP group, so every rank of the last pipeline stage reports the same numbers.

`kd-teacher consistency CONFIG [key=value ...]` does the same from a teacher config on random token batches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from kd_teacher.topk import vocab_parallel_topk

log = logging.getLogger(__name__)


@dataclass
class ConsistencyReport:
    recipe: str
    batches: int = 0
    bitwise_equal: bool = True
    payload_bitwise_equal: bool = True
    max_abs_logit_diff: float = 0.0
    max_abs_logprob_diff: float = 0.0
    topk_index_agreement: float = 1.0
    per_batch: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _full_logprobs(logits: torch.Tensor, temperature: float, vocab_size: int, group) -> torch.Tensor:
    """Vocab-parallel log-softmax of this shard (padding columns excluded from the normaliser)."""
    _, _, lse = vocab_parallel_topk(logits, 1, temperature=temperature, vocab_size=vocab_size, group=group)
    return logits.float() / temperature - lse.unsqueeze(-1)


def _max_over(group, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def check_consistency(engine, batches: list[torch.Tensor]) -> ConsistencyReport | None:
    """Compare training path and teacher mode on `batches`; None on ranks off the last pipeline stage."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_tensor_model_parallel_group()
    tp = mpu.get_tensor_model_parallel_world_size()
    cfg = engine.config
    report = ConsistencyReport(recipe=engine.recipe.name)
    agreements = []
    last_stage = mpu.is_pipeline_last_stage()
    for tokens in batches:
        train = engine.training_logits(tokens)
        teach = engine.teacher_logits(tokens)
        payload = engine.score(tokens)
        if not last_stage:
            continue
        v_local = train.shape[-1]
        start = mpu.get_tensor_model_parallel_rank() * v_local
        valid = max(0, min(v_local, engine.vocab_size - start))
        a, b = train[..., :valid].float(), teach[..., :valid].float()
        differ = 0.0 if torch.equal(train[..., :valid], teach[..., :valid]) else 1.0
        bitwise = _max_over(group, differ) == 0.0
        logit_diff = _max_over(group, (a - b).abs().max().item() if valid else 0.0)
        lp_a = _full_logprobs(train, cfg.temperature, engine.vocab_size, group)[..., :valid]
        lp_b = _full_logprobs(teach, cfg.temperature, engine.vocab_size, group)[..., :valid]
        lp_diff = _max_over(group, (lp_a - lp_b).abs().max().item() if valid else 0.0)
        ref_v, ref_i, ref_lse = vocab_parallel_topk(
            train, cfg.k, temperature=cfg.temperature, vocab_size=engine.vocab_size, group=group if tp > 1 else None
        )
        served_i = payload.indices.to(ref_i.device).long()
        same_ids = (torch.sort(served_i, -1).values == torch.sort(ref_i, -1).values).all(-1)
        agreement = same_ids.float().mean().item()
        payload_equal = (
            torch.equal(payload.values.to(ref_v.device), ref_v)
            and torch.equal(served_i, ref_i)
            and torch.equal(payload.lse.to(ref_lse.device), ref_lse)
        )
        report.per_batch.append(
            dict(shape=list(tokens.shape), bitwise_equal=bitwise, payload_bitwise_equal=payload_equal,
                 max_abs_logit_diff=logit_diff, max_abs_logprob_diff=lp_diff, topk_index_agreement=agreement)
        )
        report.bitwise_equal &= bitwise
        report.payload_bitwise_equal &= payload_equal
        report.max_abs_logit_diff = max(report.max_abs_logit_diff, logit_diff)
        report.max_abs_logprob_diff = max(report.max_abs_logprob_diff, lp_diff)
        agreements.append(agreement)
    if not last_stage:
        return None
    report.batches = len(report.per_batch)
    report.topk_index_agreement = min(agreements) if agreements else 1.0
    return report


# ---- CLI -------------------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("consistency", help="teacher mode vs the training-path forward on the same micro-batches")
    p.add_argument("config", help="teacher config YAML (model:, engine:, checkpoint:)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report JSON here")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from kd_teacher.engine.loading import build_engine, load_teacher_config
    from kd_teacher.engine.model import init_model_parallel
    from kd_teacher.runtime import is_main_rank

    cfg = load_teacher_config(args.config, args.overrides)
    init_model_parallel(cfg.model)
    engine = build_engine(cfg)
    g = torch.Generator().manual_seed(args.seed)
    seq = min(args.seq_len, cfg.model.max_sequence_length)
    batches = [torch.randint(0, cfg.model.vocab_size, (args.batch_size, seq), generator=g) for _ in range(args.batches)]
    report = check_consistency(engine, batches)
    if report is not None and (is_main_rank() or dist.get_rank() == dist.get_world_size() - 1):
        text = report.to_json()
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(text)
        if not report.payload_bitwise_equal:
            log.warning("served payload differs from the training-path top-k under recipe %s", report.recipe)
    return 0
