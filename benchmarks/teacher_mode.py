"""Teacher-mode throughput against the bare eval forward of the same model, same run.

    python benchmarks/teacher_mode.py --preset cpu            # tiny model, local layer spec, fp32
    python benchmarks/teacher_mode.py --preset gpu --out r.json  # ~1.5B GPT, TE layer spec, bf16, 2 x 4096 tokens
    python benchmarks/teacher_mode.py --preset gpu --moe --out r.json  # Qwen3-MoE-shaped teacher (64 experts, top-8)

Teacher mode = `TeacherEngine.score`: token checks, forward through Megatron-Core's pipeline schedule,
vocab-parallel top-k + LSE, payload with token hashes. Baseline = `model(tokens, position_ids, None)` under
eval + no_grad. The ratio (teacher tokens/s over forward tokens/s) is what the issues target (>= 0.95, then
>= 0.97 on the GPU). The same run also times teacher mode taking its top-k from the logits the model returns
(`engine.extract_at_output_layer: false`): the difference is GPTModel's [b, s, V] copy of the logits, which
the default (top-k at the output layer) never makes. `--extraction reference` forces the plain PyTorch top-k
path even on CUDA, to compare with the fused kernel when one is present.

`--moe`: the teacher has Megatron-Core MoE layers (router, all-to-all dispatcher; TE grouped GEMM under the TE
spec, SequentialMLP under the local one), dropless. The run also measures its batch dependence (row 0 scored
alone against the same row inside each of 5 random batches: the serving policy assumes it may differ,
`engine/moe_policy.py`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import sync  # noqa: E402

from kd_teacher.config import from_dict  # noqa: E402
from kd_teacher.engine.engine import EngineConfig, TeacherEngine  # noqa: E402
from kd_teacher.engine.model import ModelConfig, build_gpt_model  # noqa: E402
from kd_teacher.runtime import init_distributed  # noqa: E402

PRESETS = {
    "cpu": dict(
        model=dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=352,
                   vocab_size=8000, max_sequence_length=256, layer_spec="local"),
        dtype="float32", batch=2, seq=256, k=64, iters=8, warmup=2,
    ),
    "gpu": dict(
        model=dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8, ffn_hidden_size=5632,
                   vocab_size=128256, max_sequence_length=4096, layer_spec="transformer_engine"),
        dtype="bfloat16", batch=2, seq=4096, k=64, iters=10, warmup=3,
    ),
}
# --moe: the preset's model with these changes (gpu: Qwen3-30B-A3B's layer shape, 16 layers, 64 of its 128 experts).
MOE = {
    "cpu": dict(model=dict(ffn_hidden_size=352, moe=dict(num_experts=8, router_topk=2, ffn_hidden_size=96))),
    "gpu": dict(model=dict(num_attention_heads=32, num_query_groups=4, kv_channels=128, qk_layernorm=True,
                           vocab_size=151936, moe=dict(num_experts=64, router_topk=8, ffn_hidden_size=768))),
}


def _time_interleaved(fns: dict, iters: int, warmup: int) -> dict:
    """Median seconds per call of each fn, calls interleaved so that drifting machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(preset: str, extraction: str, layer_spec: str | None, iters: int | None = None, moe: bool = False) -> dict:
    p = dict(PRESETS[preset])
    if iters:
        p["iters"] = iters
    mcfg = dict(p["model"])
    if moe:
        mcfg.update(MOE[preset]["model"])
    if layer_spec:
        mcfg["layer_spec"] = layer_spec
    cfg = from_dict(ModelConfig, {**mcfg, "precision": {"params_dtype": p["dtype"]}})
    init_distributed(1, 1, cfg.seed)
    torch.manual_seed(cfg.seed)
    model, _ = build_gpt_model(cfg)

    def make_engine(at_output_layer: bool) -> TeacherEngine:
        ecfg = EngineConfig(k=p["k"], max_tokens_per_batch=p["batch"] * p["seq"],
                            extract_at_output_layer=at_output_layer)
        return TeacherEngine(model, cfg.vocab_size, ecfg, model_config=cfg, fingerprint="benchmark")

    engine, engine_returned = make_engine(True), make_engine(False)
    if extraction == "reference":
        import kd_teacher.topk as topk

        topk._local_stats = topk.local_topk_stats  # skip the fused-kernel dispatch
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (p["batch"], p["seq"]), generator=g).to(device)
    position_ids = torch.arange(p["seq"], device=device).unsqueeze(0).expand_as(tokens)

    # eval() once, outside the timing: model.eval() walks every module through nn.Module.__setattr__, ~1 ms of
    # host time on a TE model that would handicap the baseline. The engine restores these flags after each pass.
    model.eval()

    def bare_forward():
        with torch.no_grad():
            model(tokens, position_ids, None)

    def teacher():
        engine.score(tokens)

    def teacher_from_returned_logits():
        engine_returned.score(tokens)

    with torch.no_grad():
        model.eval()
        logits = model(tokens, position_ids, None)
    from kd_teacher.topk import vocab_parallel_topk

    batch_dependence = _batch_dependence(engine, tokens) if moe else None
    times = _time_interleaved(
        {
            "forward": bare_forward,
            "teacher": teacher,
            "teacher_returned_logits": teacher_from_returned_logits,
            "extract": lambda: vocab_parallel_topk(logits, p["k"], vocab_size=cfg.vocab_size),
        },
        p["iters"], p["warmup"],
    )
    t_forward, t_teacher, t_extract = times["forward"], times["teacher"], times["extract"]
    t_returned = times["teacher_returned_logits"]
    n_tokens = tokens.numel()
    result = dict(
        benchmark="teacher_mode",
        preset=preset,
        extraction=extraction,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        torch=torch.__version__,
        params=_params(model),
        tokens_per_batch=n_tokens,
        k=p["k"],
        logits_shape=list(logits.shape),
        logits_dtype=str(logits.dtype),
        bare_forward_ms=t_forward * 1e3,
        teacher_mode_ms=t_teacher * 1e3,
        extraction_site=engine.extraction_site,
        teacher_mode_returned_logits_ms=t_returned * 1e3,
        ratio_returned_logits=t_forward / t_returned,
        extraction_ms=t_extract * 1e3,
        bare_forward_tokens_per_s=n_tokens / t_forward,
        teacher_mode_tokens_per_s=n_tokens / t_teacher,
        ratio=t_forward / t_teacher,
        model=asdict(cfg),
        batch_dependence=batch_dependence,
        date=time.strftime("%Y-%m-%d"),
    )
    return result


def _batch_dependence(engine: TeacherEngine, tokens: torch.Tensor, trials: int = 5) -> dict:
    """Row 0 scored alone and inside a batch, for `trials` random batches of the benchmark's shape: how many
    differ, by how much. (MoE: the expert GEMMs see other token counts when the rest of the batch changes.)"""
    g = torch.Generator().manual_seed(1)
    differ, worst = 0, 0.0
    for _ in range(trials):
        batch = torch.randint(0, engine.vocab_size, tuple(tokens.shape), generator=g).to(tokens.device)
        alone, inside = engine.teacher_logits(batch[:1]), engine.teacher_logits(batch)[:1]
        differ += not torch.equal(alone, inside)
        worst = max(worst, (alone.float() - inside.float()).abs().max().item())
    return dict(trials=trials, row0_differs=differ, max_abs_logit_diff=worst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--extraction", choices=["auto", "reference"], default="auto")
    ap.add_argument("--layer-spec", choices=["local", "transformer_engine"], default=None)
    ap.add_argument("--iters", type=int, default=None, help="timed calls of each function (default: the preset's)")
    ap.add_argument("--moe", action="store_true", help="a MoE teacher (Megatron-Core MoE layers, dropless)")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args()
    result = run(args.preset, args.extraction, args.layer_spec, args.iters, args.moe)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    print(f"\nteacher mode / bare forward throughput ratio: {result['ratio']:.3f} "
          f"({result['teacher_mode_tokens_per_s']:.0f} vs {result['bare_forward_tokens_per_s']:.0f} tokens/s, "
          f"extraction alone {result['extraction_ms']:.2f} ms; top-k at the {result['extraction_site']})")
    print(f"teacher mode from the returned logits: {result['ratio_returned_logits']:.3f}")
    if result["batch_dependence"] is not None:
        bd = result["batch_dependence"]
        print(f"MoE batch dependence: row 0 alone != row 0 in the batch in {bd['row0_differs']} of {bd['trials']} "
              f"batches (max |logit diff| {bd['max_abs_logit_diff']:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
