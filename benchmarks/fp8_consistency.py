"""FP8 consistency on the GPU: the teacher served under each Transformer Engine recipe, against its own
training-path forward, alone and inside mixed batches. Needs CUDA, Transformer Engine and megatron-core.

    python benchmarks/fp8_consistency.py --out $OUT/fp8_consistency.json          # TP=1, and TP=2 on 2+ GPUs
    python benchmarks/fp8_consistency.py --recipes bf16,delayed --tp 1 --layers 4  # a quicker subset

Every TP size runs in its own spawned process group (NCCL), every recipe in its own try/except: a recipe
that fails (mxfp8 on a Hopper GPU, say) is recorded with its error and the run goes on. Per recipe:

- consistency: `check_consistency` (served top-k values and LSE vs the training-path forward of the same
  micro-batches: bitwise yes/no, max logit / log-prob diffs);
- batch dependence: one prompt alone vs the same prompt as row 0 of a mixed batch (logits and payload);
- policy: `score_many` of two requests of different lengths vs each scored alone (must be bitwise equal
  under every recipe: the engine repacks only where the recipe allows it);
- weight cache: weights changed in place; a direct forward before and after `reset_fp8_caches`; then
  `reload_weights` and a consistency check on the reloaded teacher;
- delayed scaling only: scales after warm-up steps; what TE does on its own in no-grad and grad-enabled
  forwards; whether engine passes leave scales and amax histories untouched; a checkpoint round trip (scales
  come back, same payload) and the refusal of a checkpoint saved before any FP8 step.

Writes the JSON to --out (rewritten after every recipe, so a killed run keeps what it finished) and prints
a table last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_teacher.engine.consistency import check_consistency  # noqa: E402
from kd_teacher.engine.engine import EngineConfig, TeacherEngine, teacher_mode, training_path  # noqa: E402
from kd_teacher.engine.fp8_state import (  # noqa: E402
    MissingFP8StateError,
    fp8_scaling_snapshot,
    preserved_fp8_state,
    scaling_state_equal,
)
from kd_teacher.engine.model import ModelConfig, PrecisionConfig, build_gpt_model, transformer_config  # noqa: E402
from kd_teacher.precision import PrecisionRecipe, require_fp8_support  # noqa: E402

RECIPES = ("bf16", "delayed", "tensorwise", "blockwise", "mxfp8")
log = logging.getLogger("fp8_consistency")


# ---- setup -------------------------------------------------------------------------------------------------------
def model_config(args, recipe: str, tp: int) -> ModelConfig:
    dtype = "float32" if args.smoke_cpu else "bfloat16"
    precision = PrecisionConfig(params_dtype=dtype)
    if recipe != "bf16":
        precision = PrecisionConfig(
            params_dtype=dtype, fp8=args.fp8_format, fp8_recipe=recipe,
            fp8_amax_history_len=args.amax_history if recipe == "delayed" else 1,
            fp8_amax_compute_algo="max" if recipe == "delayed" else "most_recent",
        )
    return ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.groups, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        max_sequence_length=args.seq, layer_spec="local" if args.smoke_cpu else "transformer_engine",
        tensor_model_parallel_size=tp, seed=args.seed, precision=precision,
    )


def token_batches(args, device) -> dict:
    """Same tokens on every rank (one generator, one seed): the micro-batches of the checks below."""
    g = torch.Generator().manual_seed(args.seed + 1)
    s, half = args.seq, args.seq // 2

    def rand(b, n):
        return torch.randint(0, args.vocab, (b, n), generator=g).to(device)

    prompt = rand(1, s)
    return dict(
        consistency=[rand(args.batch, s) for _ in range(args.batches)],
        prompt=prompt,
        mixed=torch.cat([prompt, rand(args.mixed_rows - 1, s)]),
        request_long=rand(args.batch, s),
        request_short=rand(args.batch, half),
    )


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _all_ranks_true(flag: bool) -> bool:
    t = torch.tensor([0.0 if flag else 1.0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_tp_group())
    return t.item() == 0.0


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_tp_group())
    return float(t.item())


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Bitwise equality and max |diff| over the whole TP group."""
    equal = _all_ranks_true(torch.equal(a, b))
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return dict(bitwise_equal=equal, max_abs_diff=_max_over_ranks(diff))


def _payload_equal(p, q) -> dict:
    same = torch.equal(p.values, q.values) and torch.equal(p.indices, q.indices) and torch.equal(p.lse, q.lse)
    return dict(bitwise_equal=_all_ranks_true(same),
                max_abs_value_diff=_max_over_ranks((p.values.float() - q.values.float()).abs().max().item()),
                max_abs_lse_diff=_max_over_ranks((p.lse - q.lse).abs().max().item()))


def direct_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own forward outside Megatron's schedules (which would reset TE's weight-cast cache)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    with teacher_mode(model):
        return model(tokens, position_ids, None).clone()


# ---- the checks ----------------------------------------------------------------------------------------------------
def batch_dependence(engine, data) -> dict:
    alone = engine.teacher_logits(data["prompt"])
    mixed = engine.teacher_logits(data["mixed"])[:1]
    out = dict(logits=_compare(alone, mixed))
    out["payload"] = _payload_equal(engine.score(data["prompt"]), engine.score(data["mixed"]).rows([0]))
    return out


def policy_check(engine, data) -> dict:
    """score_many of two requests of different lengths vs each alone: equal under every recipe."""
    from kd_teacher.engine.scheduler import ScoreRequest

    long_, short = data["request_long"], data["request_short"]
    plan = engine.scheduler.plan([ScoreRequest(long_), ScoreRequest(short)])
    together = engine.score_many([ScoreRequest(long_.clone()), ScoreRequest(short.clone())])
    separate = [engine.score(long_), engine.score(short)]
    eq = [_payload_equal(a, b) for a, b in zip(together, separate)]
    return dict(allow_repacking=engine.policy.allow_repacking, forwards=len(plan),
                bitwise_equal=all(e["bitwise_equal"] for e in eq),
                max_abs_value_diff=max(e["max_abs_value_diff"] for e in eq))


def weight_cache_check(engine, data) -> dict:
    """In-place weight change: stale FP8 casts without a reset, fresh ones after; then reload_weights."""
    model = engine.model
    tokens = data["prompt"]
    original = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
                and "_extra_state" not in k}
    engine.score(tokens)  # a schedule call: TE re-casts and caches the weights
    before = direct_forward(model, tokens)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                p.mul_(1.25)
    stale = direct_forward(model, tokens)
    reset = engine.reset_fp8_caches()
    fresh = direct_forward(model, tokens)
    out = dict(te_layers_reset=reset,
               output_unchanged_without_reset=_all_ranks_true(torch.equal(stale, before)),
               output_changed_after_reset=not _all_ranks_true(torch.equal(fresh, before)))
    fp_changed = engine.fingerprint
    engine.reload_weights(original)
    out["reload_restores_output"] = _all_ranks_true(torch.equal(direct_forward(model, tokens), before))
    out["fingerprint_updated"] = engine.fingerprint != fp_changed
    report = check_consistency(engine, data["consistency"][:1])
    out["consistency_after_reload"] = report.payload_bitwise_equal if report is not None else None
    return out


def delayed_scaling_checks(args, engine, mc, data, ckpt_root: Path) -> dict:
    """Warm-up steps set real scales; then what TE does itself and what the engine guarantees."""
    model = engine.model
    out = {}
    initial = fp8_scaling_snapshot(model)
    warm = data["consistency"][0]
    b, s = warm.shape
    positions = torch.arange(s, device=warm.device).unsqueeze(0).expand(b, s)
    model.train()
    for _ in range(args.delayed_warmup):  # grad-enabled forwards: TE updates amax history and scales on exit
        with torch.enable_grad():
            model(warm, positions, None)
    model.eval()
    warmed = fp8_scaling_snapshot(model)
    out["modules_with_scales"] = len(warmed)
    out["warmup_changed_scales"] = scaling_state_equal(initial, warmed, history=False) is not None
    with preserved_fp8_state(model):  # TE on its own; put back afterwards
        direct_forward(model, warm)
        after_nograd = fp8_scaling_snapshot(model)
        out["te_nograd_keeps_scales"] = scaling_state_equal(warmed, after_nograd, history=False) is None
        out["te_nograd_writes_amax_history"] = scaling_state_equal(warmed, after_nograd) is not None
        with training_path(model):
            model(warm, positions, None)
            inside = fp8_scaling_snapshot(model)
        out["te_grad_forward_updates_scales"] = scaling_state_equal(after_nograd, inside, history=False) is not None
        out["training_path_puts_state_back"] = scaling_state_equal(after_nograd, fp8_scaling_snapshot(model)) is None
    engine.score(warm)
    check_consistency(engine, data["consistency"][:1])
    out["engine_leaves_scales_and_history"] = scaling_state_equal(warmed, fp8_scaling_snapshot(model)) is None
    return out


def delayed_checkpoint_round_trip(args, engine, mc, data, ckpt_root: Path) -> dict:
    from kd_teacher.engine.checkpoint import save_checkpoint

    out = {}
    trained = ckpt_root / "delayed_trained"
    save_checkpoint(engine.model, trained)
    dist.barrier()
    # TE >= 2.20 refuses pickled delayed-scaling extra state unless told; this checkpoint is our own.
    os.environ["NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"] = "1"
    torch.manual_seed(args.seed + 7)  # other initial weights: everything must come from the checkpoint
    loaded = TeacherEngine.from_checkpoint(trained, mc, EngineConfig(k=args.k))
    saved_state, loaded_state = fp8_scaling_snapshot(engine.model), fp8_scaling_snapshot(loaded.model)
    differs = scaling_state_equal(saved_state, loaded_state, history=False)
    out["scales_restored"] = differs is None
    out["scales_differ_at"] = differs  # None, a module name, or the modules only one side has state for
    out["modules_with_scales_saved_vs_loaded"] = [len(saved_state), len(loaded_state)]
    out["same_payload_as_saved_teacher"] = _payload_equal(engine.score(data["prompt"]),
                                                          loaded.score(data["prompt"]))["bitwise_equal"]
    # Scales of the modules both sides have state for, after the loaded teacher's first forward (TE creates
    # the state of a module without FP8 checkpoint data only then), and whether a second pass still equals.
    after = fp8_scaling_snapshot(loaded.model)
    common = sorted(set(saved_state) & set(after))
    out["scales_equal_on_common_modules_after_first_forward"] = scaling_state_equal(
        {n: saved_state[n] for n in common}, {n: after[n] for n in common}, history=False) is None
    out["second_payload_as_saved_teacher"] = _payload_equal(engine.score(data["prompt"]),
                                                            loaded.score(data["prompt"]))["bitwise_equal"]
    report = check_consistency(loaded, data["consistency"][:1])
    out["loaded_consistency_payload_bitwise"] = report.payload_bitwise_equal if report is not None else None
    del loaded
    torch.manual_seed(args.seed)
    fresh, _ = build_gpt_model(mc)  # never ran an FP8 step: its TE extra state is empty
    untrained = ckpt_root / "delayed_untrained"
    save_checkpoint(fresh, untrained)
    del fresh
    dist.barrier()
    try:
        TeacherEngine.from_checkpoint(untrained, mc, EngineConfig(k=args.k))
        out["untrained_checkpoint"] = "accepted (WRONG: it carries no scales)"
    except MissingFP8StateError as e:
        out["untrained_checkpoint"] = f"refused: {str(e)[:160]}..."
    accepted = TeacherEngine.from_checkpoint(untrained, mc, EngineConfig(k=args.k, accept_initial_fp8_scales=True))
    out["untrained_accepted_with_flag"] = accepted.recipe.delayed_scaling
    del accepted
    return out


def run_recipe(args, recipe: str, tp: int, data, ckpt_root: Path) -> dict:
    mc = model_config(args, recipe, tp)
    precision = PrecisionRecipe.from_transformer_config(transformer_config(mc))
    out = dict(recipe=recipe, tp=tp, description=precision.describe(), fingerprint=precision.fingerprint())
    require_fp8_support(precision)  # before building: a clear error instead of a TE assertion deep inside
    t0 = time.perf_counter()
    torch.manual_seed(mc.seed)
    model, _ = build_gpt_model(mc)
    # Repacking opted in where the recipe permits it at all: this measures whether it holds (engine_policy_holds).
    repacking = "any" if precision.batch_invariant else "off"
    engine = TeacherEngine(model, mc.vocab_size, EngineConfig(k=args.k, accept_initial_fp8_scales=True,
                                                              repacking=repacking),
                           model_config=mc, fingerprint=f"fp8-consistency-{recipe}")
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["params"] = sum(p.numel() for p in model.parameters()) * tp
    out["policy"] = dict(allow_repacking=engine.policy.allow_repacking, frozen_scales=engine.policy.frozen_scales,
                         reason=engine.policy.reason)
    t0 = time.perf_counter()
    # --smoke-cpu runs the delayed-scaling code on the high-precision model too (no scales there), only to
    # exercise this script's own logic where no GPU is at hand.
    delayed_checks = precision.delayed_scaling or args.smoke_cpu
    if delayed_checks:
        out["delayed"] = delayed_scaling_checks(args, engine, mc, data, ckpt_root)
    report = check_consistency(engine, data["consistency"])
    if report is not None:
        out["consistency"] = json.loads(report.to_json())
    # Each further check on its own: one that fails is recorded and the others still run.
    out["batch_dependence"] = guarded(batch_dependence, engine, data)
    out["engine_policy_holds"] = guarded(policy_check, engine, data)
    out["weight_cache"] = guarded(weight_cache_check, engine, data)
    if delayed_checks and args.checkpoint_check:
        out["delayed"]["checkpoint"] = guarded(delayed_checkpoint_round_trip, args, engine, mc, data, ckpt_root)
    out["checks_s"] = round(time.perf_counter() - t0, 1)
    # "output_layer" unless the engine's first-forward check found the tapped top-k differing from the top-k of
    # the returned logits under this recipe (then it serves from the returned logits, still bitwise).
    out["extraction_site"] = engine.extraction_site
    same_alone_mixed = out["batch_dependence"].get("payload", {}).get("bitwise_equal")
    out["ok"] = (
        bool(report is None or report.payload_bitwise_equal)
        and out["engine_policy_holds"].get("bitwise_equal") is True
        and (not precision.batch_invariant or same_alone_mixed is True)
    )
    del engine, model
    return out


def guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded in the results
        return dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])


# ---- one process group per TP size ---------------------------------------------------------------------------------
def worker(rank: int, tp: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    from kd_teacher.runtime import init_distributed

    init_distributed(tp, 1, args.seed)
    data = token_batches(args, _device())
    ckpt_root = Path(args.checkpoint_root) / f"tp{tp}"
    results = []
    for recipe in args.recipes:
        t0 = time.perf_counter()
        try:
            res = run_recipe(args, recipe, tp, data, ckpt_root)
        except Exception as e:  # noqa: BLE001 - recorded, the next recipe still runs
            res = dict(recipe=recipe, tp=tp, error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc()[-3000:])
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if rank == 0:
            Path(out_path).write_text(json.dumps(results, indent=2, default=str))
            log.info("TP=%d %s: %s in %.1f s", tp, recipe, res.get("error", "done"), res["seconds"])
    dist.barrier()
    dist.destroy_process_group()


def run_tp(args, tp: int, timeout_s: float) -> list:
    import torch.multiprocessing as mp

    from kd_teacher.runtime import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, f"tp{tp}.json")
        ctx = mp.spawn(worker, args=(tp, free_port(), args, out_path), nprocs=tp, join=False)
        deadline = time.time() + timeout_s
        error = None
        try:
            while not ctx.join(timeout=5):
                if time.time() > deadline:
                    error = f"TP={tp} did not finish within {timeout_s:.0f} s; killed"
                    break
        except Exception as e:  # noqa: BLE001 - a rank died: keep what rank 0 wrote
            error = f"TP={tp} worker failed: {type(e).__name__}: {str(e)[-2000:]}"
        if error:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = json.loads(Path(out_path).read_text()) if os.path.exists(out_path) else []
    if error:
        results.append(dict(tp=tp, error=error))
    return results


def environment() -> dict:
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
    for name, module in (("transformer_engine", "transformer_engine"), ("megatron_core", "megatron.core.package_info")):
        try:
            env[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as e:  # noqa: BLE001
            env[name] = f"unavailable: {e}"
    return env


def _flag(value) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def table(results: list) -> str:
    head = ("tp", "recipe", "train==served", "max logit diff", "alone==mixed", "alone/mixed max diff",
            "score_many==alone", "repack", "notes")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((str(r.get("tp")), r.get("recipe", "?"), "ERROR", "", "", "", "", "", r["error"][:90]))
            continue
        c = r.get("consistency", {})
        bd = r["batch_dependence"].get("payload", {})
        notes = [f"{name} failed" for name in ("batch_dependence", "engine_policy_holds", "weight_cache")
                 if "error" in r[name]]
        if "delayed" in r:
            d = r["delayed"]
            notes.append(f"scales frozen by engine: {_flag(d.get('engine_leaves_scales_and_history'))}")
            if "checkpoint" in d:
                # Modules without FP8 state in the checkpoint (core attention without FP8 attention) have
                # none after loading either: the scales that count are those of the modules that have state.
                ck = d["checkpoint"]
                back = ck.get("scales_equal_on_common_modules_after_first_forward", ck.get("scales_restored"))
                notes.append(f"ckpt scales back: {_flag(back)}")
        notes.append(f"stale w/o reset: {_flag(r['weight_cache'].get('output_unchanged_without_reset'))}")
        rows.append((str(r["tp"]), r["recipe"], _flag(c.get("payload_bitwise_equal")),
                     f"{c.get('max_abs_logit_diff', float('nan')):.3g}", _flag(bd.get("bitwise_equal")),
                     f"{bd.get('max_abs_value_diff', float('nan')):.3g}",
                     _flag(r["engine_policy_holds"].get("bitwise_equal")),
                     _flag(r["policy"]["allow_repacking"]), "; ".join(notes)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of " + ", ".join(RECIPES))
    p.add_argument("--tp", default="auto", help="comma list of TP sizes; auto: 1, and 2 when 2 GPUs are visible")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--batches", type=int, default=2, help="micro-batches for the consistency check")
    p.add_argument("--mixed-rows", type=int, default=3, help="rows of the mixed batch holding the prompt")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--fp8-format", default="hybrid", choices=("e4m3", "hybrid"))
    p.add_argument("--amax-history", type=int, default=16)
    p.add_argument("--delayed-warmup", type=int, default=3, help="grad-enabled forwards that set real scales")
    p.add_argument("--no-checkpoint-check", dest="checkpoint_check", action="store_false")
    p.add_argument("--checkpoint-root", default=None, help="scratch directory for the delayed checkpoints")
    p.add_argument("--timeout", type=float, default=270.0, help="seconds per TP size before it is killed")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="exercise the script's own logic on a CPU (local layer spec, fp32, gloo): FP8 recipes "
                        "are then recorded as errors; use with a tiny model")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="benchmarks/results/fp8_consistency.json")
    args = p.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke_cpu:
        print("fp8_consistency needs a CUDA GPU (Transformer Engine FP8); none is visible", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if not args.smoke_cpu else 2
    tps = [1, 2] if args.tp == "auto" else [int(t) for t in args.tp.split(",")]
    tps = [t for t in tps if t <= gpus] if args.tp == "auto" else tps
    scratch = Path(args.checkpoint_root or tempfile.mkdtemp(prefix="fp8_consistency_"))
    args.checkpoint_root = str(scratch)
    started = time.time()
    results = []
    try:
        for tp in tps:
            if tp > gpus:
                results.append(dict(tp=tp, error=f"TP={tp} needs {tp} GPUs, {gpus} visible"))
                continue
            results += run_tp(args, tp, args.timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    doc = dict(what="FP8 teacher consistency: served payload vs training-path forward, per recipe and TP size",
               date=datetime.date.today().isoformat(), environment=environment(),
               args={k: v for k, v in vars(args).items() if k != "checkpoint_root"},
               seconds=round(time.time() - started, 1), results=results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str))
    print(table(results))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
