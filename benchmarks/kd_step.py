"""Student training-step time with KD from an offline dump and from an in-process teacher, against the CE-only
step of the same student, same run.

    python benchmarks/kd_step.py --preset cpu
    python benchmarks/kd_step.py --preset gpu --out $OUT/kd_step_gpu.json

A step = Megatron-Core's `forward_backward_no_pipelining` over `num_microbatches` micro-batches (the user's
forward_step calls `model(..., labels=labels)`, as Megatron-LM's does) + Megatron's optimizer step, on a DDP
wrapped GPTModel. Modes, timed interleaved so that drifting load hits all alike:
  ce         - the unwrapped forward_step (baseline)
  offline    - wrap_forward_step with an OfflineTeacher over a dump of exactly these micro-batches
               (target on the GPU: ratio to ce <= 1.05)
  in_process - wrap_forward_step with a TeacherEngine on the same rank (the co-located baseline; reported)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import sync  # noqa: E402

from kd_teacher.demo import forward_step  # noqa: E402
from kd_teacher.engine.model import ModelConfig, PrecisionConfig, build_gpt_model  # noqa: E402
from kd_teacher.runtime import init_distributed  # noqa: E402

_SMALL = dict(num_attention_heads=4, num_query_groups=2, layer_spec="local", make_vocab_size_divisible_by=128)
PRESETS = {
    "cpu": dict(
        student=dict(num_layers=2, hidden_size=128, ffn_hidden_size=352, vocab_size=8000, max_sequence_length=256,
                     **_SMALL),
        teacher=dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, vocab_size=8000, max_sequence_length=256,
                     **_SMALL),
        dtype="float32", micro_batch_size=2, seq=256, num_microbatches=2, k=64, steps=6, warmup=2,
    ),
    "gpu": dict(
        student=dict(num_layers=12, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16,
                     num_query_groups=8, vocab_size=128256, max_sequence_length=4096, layer_spec="local",
                     make_vocab_size_divisible_by=128),
        teacher=dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                     num_query_groups=8, vocab_size=128256, max_sequence_length=4096, layer_spec="local",
                     make_vocab_size_divisible_by=128),
        dtype="bfloat16", micro_batch_size=2, seq=4096, num_microbatches=4, k=64, steps=10, warmup=3,
    ),
}


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---- the student's script: model + optimizer (forward_step and its loss are the demo's, Megatron-LM style) ----
def build_student(cfg: ModelConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    torch.manual_seed(cfg.seed)
    model, tconfig = build_gpt_model(cfg)
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0, bf16=tconfig.bf16, params_dtype=tconfig.params_dtype),
        [model],
    )
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    return model, optimizer


def micro_batches(p: dict, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    b, s, device = p["micro_batch_size"], p["seq"], _device()
    out = []
    for _ in range(p["num_microbatches"]):
        seq = torch.randint(0, vocab, (b, s + 1), generator=g)
        out.append({"tokens": seq[:, :-1].to(device), "labels": seq[:, 1:].to(device),
                    "loss_mask": torch.ones(b, s, device=device),
                    "position_ids": torch.arange(s, device=device).expand(b, s).contiguous()})
    return out


# ---- the teachers ----------------------------------------------------------------------------------------------
def write_dump(engine, teacher_cfg: ModelConfig, batches, directory: Path, k: int) -> None:
    from kd_teacher.config import from_dict
    from kd_teacher.offline.writer import DumpConfig, run_dump

    rows = directory / "rows.jsonl"
    rows.write_text("".join(json.dumps(r.tolist()) + "\n" for b in batches for r in b["tokens"].cpu()))
    teacher = json.loads(json.dumps({"model": {**teacher_cfg.__dict__, "precision": vars(teacher_cfg.precision)},
                                     "engine": {"k": k}}))
    cfg = from_dict(DumpConfig, {"teacher": teacher, "data": {"kind": "jsonl", "path": str(rows)},
                                 "output": {"dir": str(directory / "dump"), "progress": False}})
    run_dump(cfg, engine=engine)


def time_train_steps(steps: dict, model, optimizer, batches, p: dict, warmup: int, iters: int) -> dict:
    """Seconds per training step of each forward_step variant in `steps`, interleaved step by step so that
    drifting machine load hits every variant alike; same model, optimizer and micro-batches for all."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()

    def train_step(step_fn):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=step_fn, data_iterator=iter(batches), model=[model],
                         num_microbatches=p["num_microbatches"], seq_length=p["seq"],
                         micro_batch_size=p["micro_batch_size"], forward_only=False)
        optimizer.step()

    for _ in range(warmup):
        for fn in steps.values():
            train_step(fn)
    sync()
    samples = {name: [] for name in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            train_step(fn)
            sync()
            samples[name].append(time.perf_counter() - t0)
    return samples


def run(preset: str) -> dict:
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.hooks import KDConfig, wrap_forward_step
    from kd_teacher.hooks.config import OfflineTeacherConfig
    from kd_teacher.hooks.sources import InProcessSource, OfflineSource
    from kd_teacher.offline.reader import OfflineTeacher

    p = PRESETS[preset]
    precision = PrecisionConfig(params_dtype=p["dtype"])
    student_cfg = ModelConfig(**p["student"], precision=precision, seed=1)
    teacher_cfg = ModelConfig(**p["teacher"], precision=precision, seed=2)
    init_distributed(1, 1, 1234)
    model, optimizer = build_student(student_cfg)
    torch.manual_seed(teacher_cfg.seed)
    teacher_model, _ = build_gpt_model(teacher_cfg)
    tokens_per_step = p["micro_batch_size"] * p["seq"] * p["num_microbatches"]
    engine = TeacherEngine(teacher_model, teacher_cfg.vocab_size,
                           EngineConfig(k=p["k"], max_tokens_per_batch=p["micro_batch_size"] * p["seq"]),
                           model_config=teacher_cfg)
    batches = micro_batches(p, student_cfg.vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix="kd_step_"))
    write_dump(engine, teacher_cfg, batches, tmp, p["k"])

    kd = dict(k=p["k"], alpha=0.9, vocab_size=student_cfg.vocab_size)
    offline_cfg = KDConfig(source="offline", offline=OfflineTeacherConfig(dir=str(tmp / "dump")), **kd).check()
    steps = {
        "ce": forward_step,
        "offline": wrap_forward_step(forward_step, offline_cfg, model=model,
                                     source=OfflineSource(OfflineTeacher(tmp / "dump"))),
        "in_process": wrap_forward_step(forward_step, offline_cfg, model=model, source=InProcessSource(engine)),
    }
    samples = time_train_steps(steps, model, optimizer, batches, p, p["warmup"], p["steps"])
    median = {name: statistics.median(v) for name, v in samples.items()}
    return {
        "benchmark": "kd_step",
        "preset": preset,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "student_params": sum(q.numel() for q in model.parameters()),
        "teacher_params": sum(q.numel() for q in teacher_model.parameters()),
        "tokens_per_step": tokens_per_step,
        "k": p["k"],
        "step_seconds_median": median,
        "samples": samples,
        "ratio_offline_over_ce": median["offline"] / median["ce"],
        "ratio_in_process_over_ce": median["in_process"] / median["ce"],
        "target_gpu_offline_ratio": 1.05,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kd_step_PRESET.json)")
    args = parser.parse_args()
    result = run(args.preset)
    out = Path(args.out or Path(__file__).parent / "results" / f"kd_step_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["step_seconds_median"]
    print(f"kd_step {args.preset} on {result['device']}: step ce {m['ce'] * 1e3:.1f} ms, offline "
          f"{m['offline'] * 1e3:.1f} ms (x{result['ratio_offline_over_ce']:.3f}), in-process "
          f"{m['in_process'] * 1e3:.1f} ms (x{result['ratio_in_process_over_ce']:.3f}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
