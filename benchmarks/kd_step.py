"""Student training-step time with KD from an offline dump and from an in-process teacher, against the CE-only
step of the same student, same run.

    python benchmarks/kd_step.py --preset cpu
    python benchmarks/kd_step.py --preset gpu --out $OUT/kd_step_gpu.json [--profile]
    python benchmarks/kd_step.py --preset gpu-1b --out $OUT/kd_step_gpu_1b.json

The student is what users train: on the GPU presets both models use the Transformer Engine layer spec
(fused/flash attention), bf16, and Megatron-LM's default fusions plus Megatron-Core's native fused
cross-entropy (`kd_teacher.engine.model.FusionConfig`); the CPU preset uses the local spec without fusions.
The CE-only step's achieved TFLOP/s is printed and recorded, so that a slow baseline cannot flatter a ratio.

A step = Megatron-Core's `forward_backward_no_pipelining` over `num_microbatches` micro-batches + Megatron's
optimizer step, on a DDP-wrapped GPTModel. The data iterator yields page-locked host tensors and the user's
forward_step moves them to the GPU with `non_blocking=True` and calls `model(..., labels=labels)`, as
Megatron-LM's `pretrain_gpt.py` does. Modes, timed interleaved so that drifting load hits all alike:
  ce              - the unwrapped forward_step (baseline)
  offline         - wrap_forward_step with an OfflineTeacher over a dump of exactly these micro-batches
                    (target on the GPU: ratio to ce <= 1.05); CE and KD from the one fused pass
  offline_separate - the same with kd.fused_ce: false: Megatron's CE and the KD loss in separate passes
  in_process      - wrap_forward_step with a TeacherEngine on the same rank
                    (target: ratio to ce + teacher_forward <= 1.03)
  teacher_forward - the teacher engine's teacher-mode forwards of the same micro-batches, alone

--profile then runs torch.profiler over a few steps of ce, offline and in_process and writes
kd_step_profile_PRESET.json next to --out (the extra milliseconds by category: benchmarks/step_profile.py),
plus gzipped chrome traces of ce and offline where they are small enough to keep (< 12 MB each).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import step_profile  # noqa: E402
from timing import sync  # noqa: E402

from kd_teacher.demo import forward_step  # noqa: E402
from kd_teacher.engine.model import ModelConfig, PrecisionConfig, build_gpt_model  # noqa: E402
from kd_teacher.runtime import init_distributed  # noqa: E402

BF16_PEAK_TFLOPS = 790.0  # measured bf16 GEMM on the H200 (docs/measured_facts.md section 2)
_SMALL = dict(num_attention_heads=4, num_query_groups=2, make_vocab_size_divisible_by=128)
_LLAMA_VOCAB = dict(vocab_size=128256, make_vocab_size_divisible_by=128, num_query_groups=8)
PRESETS = {
    "cpu": dict(
        student=dict(num_layers=2, hidden_size=128, ffn_hidden_size=352, vocab_size=8000, max_sequence_length=256,
                     **_SMALL),
        teacher=dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, vocab_size=8000, max_sequence_length=256,
                     **_SMALL),
        layer_spec="local", dtype="float32", micro_batch_size=2, seq=256, num_microbatches=2, k=64, steps=6,
        warmup=2,
    ),
    # 404M student, 1.28B teacher; 4 micro-batches of 2 x 4096 tokens.
    "gpu": dict(
        student=dict(num_layers=12, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16,
                     max_sequence_length=4096, **_LLAMA_VOCAB),
        teacher=dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                     max_sequence_length=4096, **_LLAMA_VOCAB),
        layer_spec="transformer_engine", dtype="bfloat16", micro_batch_size=2, seq=4096, num_microbatches=4, k=64,
        steps=10, warmup=3,
    ),
    # 1.09B student, 3.2B teacher; 4 micro-batches of 1 x 8192 tokens.
    "gpu-1b": dict(
        student=dict(num_layers=12, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                     max_sequence_length=8192, **_LLAMA_VOCAB),
        teacher=dict(num_layers=24, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24,
                     max_sequence_length=8192, **_LLAMA_VOCAB),
        layer_spec="transformer_engine", dtype="bfloat16", micro_batch_size=1, seq=8192, num_microbatches=4, k=64,
        steps=10, warmup=3,
    ),
}
FLOPS_FORMULA = ("6 * N * T + 12 * L * h * s^2 * (T / s): fwd+bwd matmul FLOPs of N parameters (all but the input "
                 "embedding table; the output layer counts) over T tokens, plus attention scores and values "
                 "(QK^T and AV, 2 matmuls of 2*s^2*h per layer forward, x3 with backward) per sequence of s tokens, "
                 "no causal discount (PaLM appendix B convention)")


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
    return model, optimizer, tconfig


def micro_batches(p: dict, vocab: int) -> list[dict]:
    """Host tensors, page-locked on a CUDA machine, as Megatron-LM's data loader (pin_memory=True) yields them."""
    g = torch.Generator().manual_seed(0)
    b, s = p["micro_batch_size"], p["seq"]
    pin = torch.cuda.is_available()
    out = []
    for _ in range(p["num_microbatches"]):
        seq = torch.randint(0, vocab, (b, s + 1), generator=g)
        batch = {"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(),
                 "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()}
        out.append({k: v.pin_memory() if pin else v for k, v in batch.items()})
    return out


def model_flops_per_step(model, cfg: ModelConfig, tokens: int, seq: int) -> float:
    """See FLOPS_FORMULA."""
    from megatron.core.utils import get_attr_wrapped_model

    gpt = get_attr_wrapped_model(model, "embedding", return_model_obj=True)
    n = sum(q.numel() for q in gpt.parameters())
    if not cfg.share_embeddings_and_output_weights:
        n -= gpt.embedding.word_embeddings.weight.numel()
    return 6.0 * n * tokens + 12.0 * cfg.num_layers * cfg.hidden_size * seq * tokens


# ---- the teachers ----------------------------------------------------------------------------------------------
def write_dump(engine, teacher_cfg: ModelConfig, batches, directory: Path, k: int) -> None:
    from kd_teacher.config import from_dict
    from kd_teacher.offline.writer import DumpConfig, run_dump

    rows = directory / "rows.jsonl"
    rows.write_text("".join(json.dumps(r.tolist()) + "\n" for b in batches for r in b["tokens"]))
    teacher = json.loads(json.dumps({"model": asdict(teacher_cfg), "engine": {"k": k}}))
    cfg = from_dict(DumpConfig, {"teacher": teacher, "data": {"kind": "jsonl", "path": str(rows)},
                                 "output": {"dir": str(directory / "dump"), "progress": False}})
    run_dump(cfg, engine=engine)


# ---- timing ----------------------------------------------------------------------------------------------------
def step_runners(modes: dict, model, optimizer, batches, p: dict, engine) -> dict:
    """One callable per mode that runs a whole step of it (queued; the caller synchronises)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()

    def train_step(step_fn):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=step_fn, data_iterator=iter(batches), model=[model],
                         num_microbatches=p["num_microbatches"], seq_length=p["seq"],
                         micro_batch_size=p["micro_batch_size"], forward_only=False)
        optimizer.step()

    def teacher_forwards():
        for b in batches:  # no host read per micro-batch (the hook makes none either): the fastest way to score
            engine.score(b["tokens"], check_finite=False)

    runners = {name: (lambda fn=fn: train_step(fn)) for name, fn in modes.items()}
    runners["teacher_forward"] = teacher_forwards
    return runners


def _peak_reset():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def time_steps(runners: dict, warmup: int, iters: int) -> tuple[dict, dict]:
    """Seconds per step of each runner, interleaved step by step so that drifting machine load hits every mode
    alike; and each mode's peak allocated device memory (GiB, None on a CPU)."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    sync()
    samples = {name: [] for name in runners}
    peaks = {name: 0.0 for name in runners}
    for _ in range(iters):
        for name, run in runners.items():
            _peak_reset()
            t0 = time.perf_counter()
            run()
            sync()
            samples[name].append(time.perf_counter() - t0)
            peak = _peak_gib()
            peaks[name] = None if peak is None else max(peaks[name], peak)
    return samples, peaks


# ---- profiling ----------------------------------------------------------------------------------------------------
def profile_modes(runners: dict, names: list, steps: int, out_dir: Path, tag: str, vocab_local: int,
                  keep_traces=("ce", "offline")) -> dict:
    """torch.profiler over `steps` steps of each mode; the accounting of step_profile.analyse per mode, and of
    each KD mode's extra milliseconds over ce. Traces of `keep_traces` are written (gzipped) to `out_dir`."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    result = {"modes": {}, "traces": {}}
    scratch = Path(tempfile.mkdtemp(prefix="kd_step_trace_"))
    try:
        for name in names:
            run = runners[name]
            run()  # one unprofiled step: nothing first-time in the trace
            sync()
            _peak_reset()
            with profile(activities=activities, record_shapes=True) as prof:
                for _ in range(steps):
                    with record_function(step_profile.STEP_RANGE):
                        run()
                        with record_function("kd_step.sync"):
                            sync()
            trace = scratch / f"{name}.json"
            prof.export_chrome_trace(str(trace))
            summary = step_profile.analyse(step_profile.load_trace(trace), vocab_local=vocab_local)
            summary["peak_allocated_gib"] = _peak_gib()
            result["modes"][name] = summary
            if name in keep_traces:
                result["traces"][name] = _keep_trace(trace, out_dir / f"kd_step_trace_{tag}_{name}.json.gz")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = result["modes"]["ce"]
    result["extra_over_ce"] = {n: step_profile.extra_over(base, m) for n, m in result["modes"].items() if n != "ce"}
    return result


def _keep_trace(trace: Path, dest: Path, limit: int = 12 * 2**20):
    with open(trace, "rb") as src, gzip.open(dest, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    size = dest.stat().st_size
    if size > limit:
        dest.unlink()
        return f"skipped: {size / 2**20:.1f} MB gzipped, over the {limit / 2**20:.0f} MB limit"
    return dest.name


# ---- the run -------------------------------------------------------------------------------------------------------
def build_configs(preset: str, layer_spec) -> tuple[dict, ModelConfig, ModelConfig]:
    p = PRESETS[preset]
    spec = layer_spec or p["layer_spec"]
    precision = PrecisionConfig(params_dtype=p["dtype"])
    student = ModelConfig(**p["student"], layer_spec=spec, precision=precision, seed=1)
    teacher = ModelConfig(**p["teacher"], layer_spec=spec, precision=replace(precision), seed=2)
    return p, student, teacher


def run(preset: str, layer_spec=None, profile_steps: int = 0, out_dir: Path = Path(".")) -> dict:
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.engine.model import transformer_config
    from kd_teacher.hooks import KDConfig, wrap_forward_step
    from kd_teacher.hooks.config import OfflineTeacherConfig
    from kd_teacher.hooks.sources import InProcessSource, OfflineSource
    from kd_teacher.offline.reader import OfflineTeacher

    p, student_cfg, teacher_cfg = build_configs(preset, layer_spec)
    init_distributed(1, 1, 1234)
    model, optimizer, tconfig = build_student(student_cfg)
    torch.manual_seed(teacher_cfg.seed)
    teacher_model, _ = build_gpt_model(teacher_cfg)
    tokens_per_step = p["micro_batch_size"] * p["seq"] * p["num_microbatches"]
    engine = TeacherEngine(teacher_model, teacher_cfg.vocab_size,
                           EngineConfig(k=p["k"], max_tokens_per_batch=p["micro_batch_size"] * p["seq"]),
                           model_config=teacher_cfg)
    batches = micro_batches(p, student_cfg.vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix="kd_step_"))
    try:
        write_dump(engine, teacher_cfg, batches, tmp, p["k"])
        kd = dict(k=p["k"], alpha=0.9, vocab_size=student_cfg.vocab_size)
        offline_cfg = KDConfig(source="offline", offline=OfflineTeacherConfig(dir=str(tmp / "dump")), **kd).check()
        separate_cfg = replace(offline_cfg, fused_ce=False)
        modes = {
            "ce": forward_step,
            "offline": wrap_forward_step(forward_step, offline_cfg, model=model,
                                         source=OfflineSource(OfflineTeacher(tmp / "dump"))),
            "offline_separate": wrap_forward_step(forward_step, separate_cfg, model=model,
                                                  source=OfflineSource(OfflineTeacher(tmp / "dump"))),
            "in_process": wrap_forward_step(forward_step, offline_cfg, model=model, source=InProcessSource(engine)),
        }
        runners = step_runners(modes, model, optimizer, batches, p, engine)
        samples, peaks = time_steps(runners, p["warmup"], p["steps"])
        profile = None
        if profile_steps:
            profile = profile_modes(runners, ["ce", "offline", "offline_separate", "in_process"], profile_steps,
                                    out_dir, preset, student_cfg.padded_vocab_size)
        fused_micro_batches = {name: getattr(fn, "fused_micro_batches", 0) for name, fn in modes.items()}
        for fn in modes.values():
            getattr(fn, "close", lambda: None)()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    median = {name: statistics.median(v) for name, v in samples.items()}
    flops = model_flops_per_step(model, student_cfg, tokens_per_step, p["seq"])
    ce_tflops = flops / median["ce"] / 1e12
    fusion_fields = ("bias_dropout_fusion", "bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                     "persist_layer_norm", "gradient_accumulation_fusion", "cross_entropy_loss_fusion",
                     "cross_entropy_fusion_impl")
    result = {
        "benchmark": "kd_step",
        "preset": preset,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "versions": _versions(),
        "layer_spec": student_cfg.layer_spec,
        "dtype": p["dtype"],
        "student_fusions": {f: getattr(tconfig, f) for f in fusion_fields},
        "student_params": sum(q.numel() for q in model.parameters()),
        "teacher_params": sum(q.numel() for q in teacher_model.parameters()),
        "micro_batch": [p["micro_batch_size"], p["seq"]],
        "num_microbatches": p["num_microbatches"],
        "tokens_per_step": tokens_per_step,
        "k": p["k"],
        "alpha": 0.9,
        "step_seconds_median": median,
        "samples": samples,
        "peak_allocated_gib": peaks,
        "ce_model_tflop_per_step": flops / 1e12,
        "ce_achieved_tflops": ce_tflops,
        "ce_fraction_of_bf16_peak": ce_tflops / BF16_PEAK_TFLOPS if torch.cuda.is_available() else None,
        "bf16_peak_tflops": BF16_PEAK_TFLOPS,
        "flops_formula": FLOPS_FORMULA,
        "fused_ce_kd_micro_batches": fused_micro_batches,
        "ratio_offline_over_ce": median["offline"] / median["ce"],
        "ratio_offline_separate_over_ce": median["offline_separate"] / median["ce"],
        "ratio_in_process_over_ce": median["in_process"] / median["ce"],
        "ratio_in_process_over_ce_plus_teacher": median["in_process"] / (median["ce"] + median["teacher_forward"]),
        "target_gpu_offline_ratio": 1.05,
        "target_gpu_in_process_ratio_over_ce_plus_teacher": 1.03,
        "fused_kd_loss_kernels": os.environ.get("KD_TEACHER_FUSED_KD_LOSS", "1") != "0",
    }
    if profile is not None:
        result["profile"] = profile
    return result


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("megatron-core", "transformer-engine", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _print_profile(profile: dict) -> None:
    print("profile (ms per step; extra over ce by category):")
    for name, extra in profile["extra_over_ce"].items():
        cats = ", ".join(f"{c} {v:+.2f}" for c, v in extra["device_ms"].items() if abs(v) >= 0.005)
        host = ", ".join(f"{c} {v:+.2f}" for c, v in extra["host_op_ms"].items() if abs(v) >= 0.005)
        print(f"  {name:11s} wall {extra['wall_ms']:+.2f}: device [{cats}], idle {extra['device_idle_ms']:+.2f}, "
              f"unaccounted {extra['unaccounted_ms']:+.2f}, host syncs {extra['host_syncs']:+.1f}; host ops [{host}]")
    for name, mode in profile["modes"].items():
        hook = sum(mode["hook_host_ms"].values())
        print(f"  {name:11s} wall {mode['wall_ms']:.2f}, device busy {mode['device_busy_ms']:.2f}, idle "
              f"{mode['device_idle_ms']:.2f}, host syncs {mode['host_syncs']:.1f}, hook host {hook:.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--layer-spec", choices=["local", "transformer_engine"], default=None,
                        help="override the preset's layer spec for both models (the CPU can only run local)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default: the preset's)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile a few steps per mode; writes kd_step_profile_PRESET.json beside --out")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kd_step_PRESET.json)")
    args = parser.parse_args()
    if args.steps is not None:
        PRESETS[args.preset]["steps"] = args.steps
    out = Path(args.out or Path(__file__).parent / "results" / f"kd_step_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args.preset, args.layer_spec, args.profile_steps if args.profile else 0, out.parent)
    profile = result.pop("profile", None)
    if profile is not None:
        path = out.parent / f"kd_step_profile_{args.preset}.json"
        path.write_text(json.dumps(profile, indent=2) + "\n")
        result["profile_json"] = path.name
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["step_seconds_median"]
    if profile is not None:
        _print_profile(profile)
    frac = result["ce_fraction_of_bf16_peak"]
    print(f"kd_step {args.preset} on {result['device']} ({result['layer_spec']}, {result['dtype']}): CE-only step "
          f"{m['ce'] * 1e3:.1f} ms = {result['ce_achieved_tflops']:.4g} TFLOP/s"
          + (f" ({frac:.1%} of {BF16_PEAK_TFLOPS:.0f})" if frac is not None else ""))
    print("| mode | ms (median) | ratio | target |")
    print("| --- | --- | --- | --- |")
    print(f"| ce | {m['ce'] * 1e3:.1f} | 1.000 | |")
    print(f"| offline | {m['offline'] * 1e3:.1f} | {result['ratio_offline_over_ce']:.3f} | <= 1.05 |")
    print(f"| offline_separate | {m['offline_separate'] * 1e3:.1f} | {result['ratio_offline_separate_over_ce']:.3f} "
          "| (CE and KD in separate passes) |")
    print(f"| teacher_forward | {m['teacher_forward'] * 1e3:.1f} | | |")
    print(f"| in_process | {m['in_process'] * 1e3:.1f} | {result['ratio_in_process_over_ce_plus_teacher']:.3f} "
          "of ce + teacher_forward | <= 1.03 |")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
