"""Is a sequence's served top-k the same when it is scored alone and when it is repacked with others?

    python benchmarks/batch_invariance.py --preset cpu --out /tmp/bi_cpu.json   # tiny models, local spec, ~1 min
    python benchmarks/batch_invariance.py --preset gpu --out $OUT/batch_invariance.json   # TE spec, bf16, H200

A teacher server that repacks requests (`engine.repacking`) runs a student's sequence inside a forward of
another shape than the student's own micro-batch: more rows (other requests of the same length), or padded to
a longer row (requests of mixed lengths, right-padded by the scheduler). cuBLAS and the fused attention pick
kernels by shape, and kernels reduce in different orders, so "bf16 is batch-invariant" is a claim to measure,
not assume. For each model and sequence length s, this scores one random sequence alone ([1, s], through
`TeacherEngine.score`, the engine's real path: output-layer top-k, fused kernel on CUDA) and then as a row of
forwards of 128 .. 16k tokens:

  rows    [T/s, s]: the sequence beside T/s - 1 other random sequences, as row 0 and as the last row
  padded  [T/2s, 2s]: the sequence right-padded (pad id 0, as the scheduler pads) to 2s, as the last row

and compares the served top-k values, ids and LSE bit for bit. The alone run is repeated first: a model whose
own repeated forward differs would make every comparison meaningless (recorded as `repeat_equal`).

The JSON is the measured table that the serving policy reads (`kd_teacher/engine/invariance.py`,
`engine.invariance_table`): per model, the GEMM-relevant shape (hidden, ffn, heads, query groups, padded
vocabulary, TP, layer spec, dtype) with the device and library versions, and per sequence length the forward
shapes proven equal to scoring alone. `--config TEACHER.yaml` measures your own teacher's shape instead of the
presets (random weights: kernels are chosen by shape, not values).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_teacher.config import from_dict, load_yaml  # noqa: E402
from kd_teacher.engine.engine import EngineConfig, TeacherEngine  # noqa: E402
from kd_teacher.engine.invariance import environment, model_key  # noqa: E402
from kd_teacher.engine.model import ModelConfig, PrecisionConfig, build_gpt_model  # noqa: E402
from kd_teacher.runtime import init_distributed  # noqa: E402

_TE = dict(layer_spec="transformer_engine", vocab_size=128256, max_sequence_length=16384)
PRESETS = {
    "gpu": dict(
        dtype="bfloat16", k=64,
        models={
            # The 1.28B teacher of the project's benchmarks (teacher_mode.py, kd_step.py, serve_capacity.py).
            "gpt-1.28b": dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
                              ffn_hidden_size=5632, **_TE),
            # Other hidden sizes, fewer layers: GEMM shapes (and so kernel choices) follow the widths.
            "hidden-1024": dict(num_layers=8, hidden_size=1024, num_attention_heads=8, num_query_groups=4,
                                ffn_hidden_size=2816, **_TE),
            "hidden-4096": dict(num_layers=4, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                                ffn_hidden_size=11008, **_TE),
        },
        seq_lens=[128, 512, 2048, 4096],
        tokens=[128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    ),
    "cpu": dict(
        dtype="float32", k=16,
        models={
            "tiny-64": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, vocab_size=1000, max_sequence_length=512, layer_spec="local",
                            make_vocab_size_divisible_by=8),
            "tiny-128": dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=352, vocab_size=2000, max_sequence_length=512, layer_spec="local"),
        },
        seq_lens=[16, 64],
        tokens=[16, 64, 256, 512],
    ),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()]) if t.is_floating_point() else t


def compare(alone, packed_row) -> dict:
    """Bitwise comparison of two (values, ids, lse) triples of one sequence."""
    (va, ia, la), (vp, ip, lp) = alone, packed_row
    return dict(
        equal=bool(torch.equal(_bits(va), _bits(vp)) and torch.equal(ia, ip) and torch.equal(_bits(la), _bits(lp))),
        values_equal=bool(torch.equal(_bits(va), _bits(vp))),
        ids_equal=bool(torch.equal(ia, ip)),
        lse_equal=bool(torch.equal(_bits(la), _bits(lp))),
        values_max_abs_diff=float((va.float() - vp.float()).abs().max()),
        lse_max_abs_diff=float((la.float() - lp.float()).abs().max()),
    )


def _row(payload, row: int, length: int) -> tuple:
    return (payload.values[row, :length].cpu(), payload.indices[row, :length].cpu().long(),
            payload.lse[row, :length].cpu())


def cases_for(seq_len: int, tokens: list[int]) -> list[dict]:
    """The forward shapes a sequence of `seq_len` tokens is repacked into, per tokens-per-forward budget."""
    out = []
    for t in tokens:
        rows = t // seq_len
        if rows >= 1:
            out.append(dict(kind="rows", rows=rows, padded_len=seq_len, position=0))
            if rows > 1:
                out.append(dict(kind="rows", rows=rows, padded_len=seq_len, position=rows - 1))
        rows = t // (2 * seq_len)
        if rows >= 1:
            out.append(dict(kind="padded", rows=rows, padded_len=2 * seq_len, position=rows - 1))
    return out


def measure_model(name: str, mcfg: ModelConfig, k: int, seq_lens: list[int], tokens: list[int]) -> dict:
    torch.manual_seed(mcfg.seed)
    model, _ = build_gpt_model(mcfg)
    model.eval()
    engine = TeacherEngine(model, mcfg.vocab_size, EngineConfig(k=k, max_tokens_per_batch=max(tokens)),
                           model_config=mcfg, fingerprint=f"batch-invariance-{name}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    cases, t0 = [], time.perf_counter()
    for s in seq_lens:
        if s > mcfg.max_sequence_length:
            continue
        seq = torch.randint(1, mcfg.vocab_size, (1, s), generator=gen)
        alone = _row(engine.score(seq.to(device)), 0, s)
        repeat = compare(alone, _row(engine.score(seq.to(device)), 0, s))
        cases.append(dict(seq_len=s, kind="repeat", rows=1, padded_len=s, position=0, tokens_per_forward=s,
                          **repeat))
        for case in cases_for(s, tokens):
            rows, length, pos = case["rows"], case["padded_len"], case["position"]
            if length > mcfg.max_sequence_length:
                continue
            batch = torch.randint(1, mcfg.vocab_size, (rows, length), generator=gen)
            batch[pos] = 0  # the scheduler's pad id
            batch[pos, :s] = seq[0]
            packed = _row(engine.score(batch.to(device)), pos, s)
            cases.append(dict(seq_len=s, tokens_per_forward=rows * length, **case, **compare(alone, packed)))
    result = dict(name=name, key=model_key(mcfg), params=sum(p.numel() for p in model.parameters()),
                  config=dict(num_layers=mcfg.num_layers, hidden_size=mcfg.hidden_size,
                              ffn_hidden_size=mcfg.ffn_hidden_size, num_attention_heads=mcfg.num_attention_heads,
                              num_query_groups=mcfg.num_query_groups, vocab_size=mcfg.vocab_size,
                              layer_spec=mcfg.layer_spec, dtype=mcfg.precision.params_dtype),
                  seconds=time.perf_counter() - t0, cases=cases, proven=proven_shapes(cases))
    del engine, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def proven_shapes(cases: list[dict]) -> dict:
    """Per sequence length, the forward shapes [rows, padded_len] in which the sequence came out bitwise equal to
    scoring it alone at every measured position (none at all if its repeated alone run differed)."""
    out: dict = {}
    for s in sorted({c["seq_len"] for c in cases}):
        mine = [c for c in cases if c["seq_len"] == s]
        if not all(c["equal"] for c in mine if c["kind"] == "repeat"):
            out[str(s)] = []
            continue
        shapes: dict = {}
        for c in mine:
            if c["kind"] != "repeat":
                key = (c["rows"], c["padded_len"])
                shapes[key] = shapes.get(key, True) and c["equal"]
        out[str(s)] = [list(key) for key, ok in sorted(shapes.items()) if ok]
    return out


def table(result: dict, tokens: list[int]) -> str:
    lines = []
    for m in result["models"]:
        lines.append(f"\n{m['name']} ({m['params'] / 1e6:.0f}M params, hidden {m['config']['hidden_size']}, "
                     f"{m['config']['dtype']}, {m['config']['layer_spec']}): '=' bitwise equal to alone, "
                     "'x' differs, '.' not measured")
        lines.append(f"{'case':<22}" + "".join(f"{t:>7}" for t in tokens))
        for s in sorted({c["seq_len"] for c in m["cases"]}):
            mine = [c for c in m["cases"] if c["seq_len"] == s]
            repeat = next(c for c in mine if c["kind"] == "repeat")
            for kind, label in (("rows", "rows"), ("padded", "padded to 2s")):
                cells = []
                for t in tokens:
                    hits = [c for c in mine if c["kind"] == kind and c["tokens_per_forward"] == t]
                    cells.append("." if not hits else "=" if all(c["equal"] for c in hits) else "x")
                lines.append(f"s={s:<6}{label:<16}" + "".join(f"{c:>7}" for c in cells))
            if not repeat["equal"]:
                lines.append(f"s={s}: the repeated alone forward itself differs")
    verdict = all(c["equal"] for m in result["models"] for c in m["cases"])
    lines.append(f"\nall repacked shapes bitwise equal to scoring alone: {'yes' if verdict else 'NO'}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--config", help="a teacher config YAML (its model: block) to measure instead of the presets")
    ap.add_argument("--models", help="comma-separated subset of the preset's models")
    ap.add_argument("--seq-lens", help="comma-separated sequence lengths (default: the preset's)")
    ap.add_argument("--tokens", help="comma-separated tokens per forward (default: the preset's)")
    ap.add_argument("--out", help="write the result JSON here (the table the serving policy reads)")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    seq_lens = [int(x) for x in args.seq_lens.split(",")] if args.seq_lens else p["seq_lens"]
    tokens = [int(x) for x in args.tokens.split(",")] if args.tokens else p["tokens"]
    init_distributed(1, 1)
    if args.config:
        mcfg = from_dict(ModelConfig, load_yaml(args.config)["model"], "model")
        models = {Path(args.config).stem: mcfg}
        k = int(load_yaml(args.config).get("engine", {}).get("k", p["k"]))
    else:
        names = args.models.split(",") if args.models else list(p["models"])
        unknown = sorted(set(names) - set(p["models"]))
        if unknown:
            ap.error(f"unknown models {unknown}; the {args.preset} preset has {sorted(p['models'])}")
        models = {n: ModelConfig(**p["models"][n], precision=PrecisionConfig(params_dtype=p["dtype"])) for n in names}
        k = p["k"]
    result = dict(benchmark="batch_invariance", preset=args.preset, environment=environment(),
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
                  seq_lens=seq_lens, tokens=tokens, k=k, date=time.strftime("%Y-%m-%d"), models=[])
    for name, mcfg in models.items():
        result["models"].append(measure_model(name, mcfg, k, seq_lens, tokens))
        m = result["models"][-1]
        print(f"{name}: {len(m['cases'])} cases in {m['seconds']:.0f} s, "
              f"{sum(not c['equal'] for c in m['cases'])} differ", flush=True)
        if args.out:  # written after each model: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result, tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
