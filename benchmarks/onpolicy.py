"""On-policy distillation on one device: generation through our wrapper against Megatron-Core's engine driven
directly, the on-policy step split into generate / teacher score / train, and the log-prob gap between sampling
and the training forward, in the model's precision, with and without Megatron-Core's batch-invariant mode.

    python benchmarks/onpolicy.py --preset cpu
    python benchmarks/onpolicy.py --preset gpu --out $OUT/onpolicy_gpu.json      # one GPU, < 8 minutes on an H200

Sections (each one's failure is recorded in the JSON and the others still run):
  generation  the same student, prompts and sampling settings (T = 1, no EOS, log-probs returned): our
              `StudentGenerator.generate` (generation mode, fp32/true-vocabulary logits hook, KV cache freed)
              against `StaticInferenceEngine(..., legacy=True).generate` on its own wrapper/context/controller,
              interleaved; ratio of tokens/s (target >= 0.95). Greedy completions of both are compared too.
              The baseline's decode rate is also given as weight bytes read per second (decode is bound by it).
  step        on-policy training steps of a DDP student with Megatron's optimizer, the KD hook (reverse KL, an
              in-process teacher) and `OnPolicyIterator`: generate (the round's rollouts), teacher score (the
              source's calls), train (the rest: the student's forward, loss, backward and optimizer step).
  gap         `onpolicy logprob gap` (mean and max |sampling-time - training-forward| log-prob per generated
              token) from the training steps, and from forward-only passes over freshly generated micro-batches
              with Megatron-Core's batch-invariant kernels off and on (on: CUDA with Triton and TE).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_step import PRESETS as STEP_PRESETS  # noqa: E402
from kd_step import build_student  # noqa: E402
from timing import sync  # noqa: E402

from kd_teacher.demo import forward_step  # noqa: E402
from kd_teacher.engine.model import ModelConfig, PrecisionConfig, build_gpt_model  # noqa: E402
from kd_teacher.runtime import init_distributed  # noqa: E402

# kd_step's student/teacher shapes and layer specs: the CPU pair (local spec), and on the GPU the 404M student and
# 1.28B teacher of docs/measured_facts.md section 3 (Transformer Engine spec, Megatron-LM's default fusions).
_SHAPES = ("student", "teacher", "layer_spec")
PRESETS = {
    "cpu": dict(**{k: STEP_PRESETS["cpu"][k] for k in _SHAPES}, dtype="float32", prompts=8, prompt_len=24,
                new_tokens=16, micro_batch_size=4, num_microbatches=2, k=16, reps=5, steps=2),
    "gpu": dict(**{k: STEP_PRESETS["gpu"][k] for k in _SHAPES}, dtype="bfloat16", prompts=32, prompt_len=128,
                new_tokens=128, micro_batch_size=8, num_microbatches=4, k=64, reps=3, steps=3),
}
COPY_PEAK_BYTES_PER_S = {"H200": 4.3e12, "H100": 2.9e12}  # measured device copy rates (docs/measured_facts.md section 2)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def _onpolicy_config(p: dict, **kw):
    from kd_teacher.onpolicy import OnPolicyConfig

    return OnPolicyConfig(max_new_tokens=p["new_tokens"], seed=7, **kw).check()


# ---- generation: our wrapper vs Megatron-Core's engine driven directly ---------------------------------------------
class _EngineDirect:
    """Megatron-Core's StaticInferenceEngine on the same model, as a user would drive it with token-id prompts."""

    def __init__(self, gpt, p: dict, greedy: bool):
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.sampling_params import SamplingParams
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        from kd_teacher.onpolicy.generation import TokenIdsTokenizer, _inference_wrapper

        batch, length = p["prompts"], p["prompt_len"] + p["new_tokens"]
        wrapper = _inference_wrapper(gpt, StaticInferenceContext(batch, length), batch, length)
        controller = TextGenerationController(wrapper, TokenIdsTokenizer(0))
        self.engine = StaticInferenceEngine(controller, max_batch_size=batch, random_seed=7, legacy=True)
        self.params = SamplingParams(top_k=1 if greedy else 0, num_tokens_to_generate=p["new_tokens"],
                                     return_log_probs=True)
        self.params.add_attributes({"no_early_termination": True})
        self.calls = 0

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        from megatron.core.inference.inference_request import InferenceRequest

        base = self.calls * len(prompts)  # request ids unique across calls
        self.calls += 1
        requests = [InferenceRequest(request_id=base + i, prompt="", prompt_tokens=list(q), sampling_params=self.params)
                    for i, q in enumerate(prompts)]
        return [r.generated_tokens.tolist() for r in self.engine.generate(inference_requests=requests)]


def _leave_inference_mode(gpt) -> None:
    """What the engine driven directly leaves behind and training cannot use: Megatron-Core >= 0.19's engines turn
    the process-wide InferenceMode flag on for good, the model stays in eval, RoPE tables cached under
    torch.inference_mode stay cached (our generator undoes all three after each call)."""
    from kd_teacher.onpolicy.generation import drop_inference_caches

    try:
        from megatron.core.inference.utils import InferenceMode

        InferenceMode.unset_active()
    except ImportError:
        pass
    drop_inference_caches(list(gpt.modules()))
    gpt.train()


def bench_generation(gpt, vocab: int, p: dict) -> dict:
    from kd_teacher.onpolicy import StudentGenerator

    prompts = _prompts(p["prompts"], p["prompt_len"], vocab, seed=1)
    length = p["prompt_len"] + p["new_tokens"]
    ours = StudentGenerator(gpt, _onpolicy_config(p), vocab_size=vocab, max_sequence_length=length,
                            max_batch_size=len(prompts))
    direct = _EngineDirect(gpt, p, greedy=False)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    runs = {"ours": lambda: ours.generate(prompts, seed=7), "engine_direct": lambda: direct.generate(prompts)}
    for fn in runs.values():  # warm-up
        fn()
    seconds = {name: [] for name in runs}
    for _ in range(p["reps"]):
        for name, fn in runs.items():
            seconds[name].append(timed(fn))
    tokens = len(prompts) * p["new_tokens"]
    rate = {name: tokens / statistics.median(v) for name, v in seconds.items()}
    greedy_ours = StudentGenerator(gpt, _onpolicy_config(p, top_k=1), vocab_size=vocab, max_sequence_length=length,
                                   max_batch_size=len(prompts)).generate(prompts, seed=7).completions
    greedy_direct = _EngineDirect(gpt, p, greedy=True).generate(prompts)
    _leave_inference_mode(gpt)
    param_bytes = sum(q.numel() * q.element_size() for q in gpt.parameters())
    steps_per_s = rate["engine_direct"] / len(prompts)
    peak = next((v for k, v in COPY_PEAK_BYTES_PER_S.items() if torch.cuda.is_available()
                 and k in torch.cuda.get_device_name()), None)
    return dict(prompts=len(prompts), prompt_len=p["prompt_len"], new_tokens=p["new_tokens"], seconds=seconds,
                tokens_per_s=rate, ratio_ours_over_engine=rate["ours"] / rate["engine_direct"], target_ratio=0.95,
                greedy_completions_equal=greedy_ours == greedy_direct,
                greedy_tokens_differing=sum(a != b for x, y in zip(greedy_ours, greedy_direct) for a, b in zip(x, y)),
                engine_decode_steps_per_s=steps_per_s, engine_weight_bytes_per_s=steps_per_s * param_bytes,
                copy_peak_bytes_per_s=peak, engine=ours.engine)


# ---- the on-policy step -------------------------------------------------------------------------------------------
def _timed_source(engine):
    from kd_teacher.hooks.sources import InProcessSource

    class TimedSource(InProcessSource):
        """The in-process teacher, with the time its scoring takes (device work included) added up."""

        seconds = 0.0

        def score(self, tokens, **kw):
            sync()
            t0 = time.perf_counter()
            out = super().score(tokens, **kw)
            sync()
            self.seconds += time.perf_counter() - t0
            return out

    return TimedSource(engine)


def _kd(p: dict, vocab: int, **on_policy):
    from kd_teacher.hooks.config import InProcessTeacherConfig, KDConfig

    return KDConfig(source="in_process", k=p["k"], kind="reverse_kl", alpha=1.0, vocab_size=vocab,
                    in_process=InProcessTeacherConfig(config="(benchmark: teacher built in code)"),
                    on_policy=_onpolicy_config(p, **on_policy)).check()


def _gap(reports: list[dict]) -> dict:
    from kd_teacher.onpolicy.consistency import GAP_KEY, GAP_MAX_KEY

    total = sum(float(r[GAP_KEY][0]) for r in reports)
    count = sum(float(r[GAP_KEY][1]) for r in reports)
    return dict(mean=total / max(count, 1.0), max=max(float(r[GAP_MAX_KEY][0]) for r in reports), tokens=count)


def bench_step(model, optimizer, teacher, vocab: int, p: dict) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kd_teacher.hooks import wrap_forward_step
    from kd_teacher.onpolicy import OnPolicyIterator

    kd = _kd(p, vocab)
    source = _timed_source(teacher)
    step_fn = wrap_forward_step(forward_step, kd, source=source, model=model)
    mbs, n_mb = p["micro_batch_size"], p["num_microbatches"]
    seq = p["prompt_len"] + p["new_tokens"]
    data = OnPolicyIterator(model, kd.on_policy, prompts=_prompts(4 * mbs * n_mb, p["prompt_len"], vocab, seed=2),
                            vocab_size=vocab, seq_length=seq, micro_batch_size=mbs, num_microbatches=n_mb)
    forward_backward = get_forward_backward_func()
    rows, gaps = [], []
    for i in range(p["steps"] + 1):  # the first step warms up
        source.seconds = 0.0
        sync()
        t0 = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(forward_step_func=step_fn, data_iterator=data, model=[model],
                                   num_microbatches=n_mb, seq_length=seq, micro_batch_size=mbs, forward_only=False)
        optimizer.step()
        sync()
        total = time.perf_counter() - t0
        generate = sum(r.seconds for r in data.last_rollouts)
        if i > 0:
            rows.append(dict(total=total, generate=generate, teacher_score=source.seconds,
                             train=total - generate - source.seconds,
                             generated_tokens=sum(r.generated_tokens for r in data.last_rollouts)))
            gaps.append(_gap(reports))
    median = {k: statistics.median(r[k] for r in rows) for k in ("total", "generate", "teacher_score", "train")}
    return dict(steps=rows, median_seconds=median,
                share={k: median[k] / median["total"] for k in ("generate", "teacher_score", "train")},
                micro_batch_size=mbs, num_microbatches=n_mb, seq_length=seq, k=p["k"],
                gap_training_steps=dict(mean=statistics.fmean(g["mean"] for g in gaps),
                                        max=max(g["max"] for g in gaps)))


def bench_gap(model, teacher, vocab: int, p: dict, batch_invariant: bool) -> dict:
    """Generate one round and run the KD hook's forward over it (forward only), in one kernel mode."""
    import contextlib

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kd_teacher.hooks import wrap_forward_step
    from kd_teacher.hooks.sources import InProcessSource
    from kd_teacher.onpolicy import OnPolicyIterator
    from kd_teacher.onpolicy.generation import batch_invariant_kernels

    mode = batch_invariant_kernels().set_batch_invariant_mode(True) if batch_invariant else contextlib.nullcontext()
    kd = _kd(p, vocab)
    mbs, n_mb = p["micro_batch_size"], p["num_microbatches"]
    seq = p["prompt_len"] + p["new_tokens"]
    with mode:
        step_fn = wrap_forward_step(forward_step, kd, source=InProcessSource(teacher), model=model)
        data = OnPolicyIterator(model, kd.on_policy, prompts=_prompts(mbs * n_mb, p["prompt_len"], vocab, seed=3),
                                vocab_size=vocab, seq_length=seq, micro_batch_size=mbs, num_microbatches=n_mb)
        batches = [next(data) for _ in range(n_mb)]
        reports = get_forward_backward_func()(forward_step_func=step_fn, data_iterator=iter(batches), model=[model],
                                              num_microbatches=n_mb, seq_length=seq, micro_batch_size=mbs,
                                              forward_only=True)
    rollouts = data.last_rollouts
    tokens = sum(r.generated_tokens for r in rollouts)
    return dict(**_gap(reports), generate_tokens_per_s=tokens / sum(r.seconds for r in rollouts))


# ---- the run -------------------------------------------------------------------------------------------------------
def _section(result: dict, name: str, fn) -> None:
    try:
        result[name] = fn()
    except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
        result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}


def run(preset: str) -> dict:
    import megatron.core

    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.onpolicy.generation import batch_invariant_kernels, dynamic_engine_unavailable

    p = PRESETS[preset]
    precision = PrecisionConfig(params_dtype=p["dtype"])
    student_cfg = ModelConfig(**p["student"], layer_spec=p["layer_spec"], precision=precision, seed=1)
    teacher_cfg = ModelConfig(**p["teacher"], layer_spec=p["layer_spec"], precision=precision, seed=2)
    init_distributed(1, 1, 1234)
    model, optimizer, _ = build_student(student_cfg)
    torch.manual_seed(teacher_cfg.seed)
    teacher_model, _ = build_gpt_model(teacher_cfg)
    seq = p["prompt_len"] + p["new_tokens"]
    teacher = TeacherEngine(teacher_model, teacher_cfg.vocab_size,
                            EngineConfig(k=p["k"], max_tokens_per_batch=p["micro_batch_size"] * seq),
                            model_config=teacher_cfg)
    vocab = student_cfg.vocab_size
    try:
        batch_invariant_kernels()
        bik_unavailable = None
    except Exception as e:  # noqa: BLE001
        bik_unavailable = str(e)
    result = {
        "benchmark": "onpolicy", "preset": preset,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "megatron_core": megatron.core.__version__,
        "layer_spec": student_cfg.layer_spec, "dtype": p["dtype"],
        "student_params": sum(q.numel() for q in model.parameters()),
        "teacher_params": sum(q.numel() for q in teacher_model.parameters()),
        "dynamic_engine_unavailable": dynamic_engine_unavailable(), "batch_invariant_unavailable": bik_unavailable,
    }
    _section(result, "generation", lambda: bench_generation(model.module, vocab, p))
    _section(result, "step", lambda: bench_step(model, optimizer, teacher, vocab, p))
    _section(result, "gap_default", lambda: bench_gap(model, teacher, vocab, p, batch_invariant=False))
    if bik_unavailable is None:
        _section(result, "gap_batch_invariant", lambda: bench_gap(model, teacher, vocab, p, batch_invariant=True))
    return result


def _table(r: dict) -> str:
    lines = [f"onpolicy {r['preset']} on {r['device']} (megatron-core {r['megatron_core']}, {r['layer_spec']}, "
             f"{r['dtype']}; student {r['student_params'] / 1e6:.0f}M, teacher {r['teacher_params'] / 1e6:.0f}M)"]
    g = r["generation"]
    if "error" in g:
        lines.append(f"  generation   ERROR {g['error']}")
    else:
        bw = (f", {g['engine_weight_bytes_per_s'] / 1e9:.0f} GB/s of weights read"
              + (f" ({g['engine_weight_bytes_per_s'] / g['copy_peak_bytes_per_s']:.1%} of copy peak)"
                 if g["copy_peak_bytes_per_s"] else ""))
        lines.append(f"  generation   ours {g['tokens_per_s']['ours']:,.0f} tok/s vs Megatron-Core engine "
                     f"{g['tokens_per_s']['engine_direct']:,.0f} tok/s{bw}: x{g['ratio_ours_over_engine']:.3f} "
                     f"(target >= {g['target_ratio']}); greedy equal: {g['greedy_completions_equal']}")
    s = r["step"]
    if "error" in s:
        lines.append(f"  step         ERROR {s['error']}")
    else:
        m, sh = s["median_seconds"], s["share"]
        parts = [f"{name} {m[key] * 1e3:.0f} ({sh[key]:.0%})"
                 for name, key in (("generate", "generate"), ("teacher score", "teacher_score"), ("train", "train"))]
        lines.append(f"  step         {m['total'] * 1e3:.0f} ms = " + " + ".join(parts))
        gap = s["gap_training_steps"]
        lines.append(f"  gap (steps)  mean {gap['mean']:.3g}, max {gap['max']:.3g}")
    for key, label in (("gap_default", "default"), ("gap_batch_invariant", "batch-inv.")):
        if key not in r:
            lines.append(f"  gap {label:9s}not measured: {r['batch_invariant_unavailable']}")
        elif "error" in r[key]:
            lines.append(f"  gap {label:9s}ERROR {r[key]['error']}")
        else:
            lines.append(f"  gap {label:9s}mean {r[key]['mean']:.3g}, max {r[key]['max']:.3g} over "
                         f"{r[key]['tokens']:.0f} tokens; generation {r[key]['generate_tokens_per_s']:,.0f} tok/s")
    lines.append(f"  dynamic engine: {r['dynamic_engine_unavailable'] or 'available (not wired)'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/onpolicy_PRESET.json)")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.preset)
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out or Path(__file__).parent / "results" / f"onpolicy_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))
    print(f"-> {out} ({result['seconds']:.0f} s)")
    failed = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
