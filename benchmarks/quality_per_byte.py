"""Quality per stored byte: students distilled from top-k payloads (with and without the tail bucket), from sampled
payloads of the same size, and from the dense full-vocabulary teacher, evaluated on held-out text.

    python benchmarks/quality_per_byte.py --preset cpu --out benchmarks/results/quality_per_byte_cpu.json
    python benchmarks/quality_per_byte.py --preset gpu --out $OUT/quality_per_byte_h200.json

The teacher is the embedded tiny teacher (kd_teacher/assets), the students the demo's student shape (a
Megatron-Core GPTModel), the data the embedded corpus: train sequences drawn from the teacher's train split,
held-out sequences from documents nobody trained on. Every student of one seed starts from the same weights and
sees the same micro-batches in the same order; only the teacher's payload differs:

  topk+tail k    the top-k (k = 4 .. 64) + the tail bucket, kd_loss(kind="forward_kl", tail=True)
  topk k         the top-k renormalised, tail=False (what most tools ship)
  sampled n      n draws per token (kd_teacher.sampling), the unbiased estimate; n = k: a sampled payload
                 stores n slots (distinct ids + counts), so it costs exactly the bytes of a top-k payload with k = n
  dense          forward KL over the whole vocabulary against the teacher's logits (the reference)
  CE only        no teacher (the floor)

Payloads are made by the product's own functions (TopKPayload.from_logits: vocab_parallel_topk /
vocab_parallel_sample) over the whole training set once, and the loss is the product's kd_loss; the loop is a
plain AdamW loop (no pipeline schedule: the study is about the payload, not the step). Seeds change the student's
initialisation, the data order and the sampled payloads' draws.

Bytes/token are what an offline dump stores per token: k values (the teacher's fp32 logits, or fp32 counts),
k ids packed at ceil(log2 V) bits, and the fp32 LSE; the dense reference stores V fp32 logits.

Held-out metrics, over every held-out token: full-vocabulary KL(teacher || student), cross-entropy of the actual
next token, and the expected calibration error of the student's top-1 probability (15 equal-width bins, accuracy
against the actual next token). The JSON holds each seed's numbers; the table shows mean +- standard deviation
over seeds. The advice per byte budget names the payload with the lowest KL and whether its lead over the next
exceeds twice the combined seed-to-seed spread of the two (unpaired), or else holds on every seed by more than
twice the spread of the per-seed differences (paired: each seed trains every payload from one initialisation).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_teacher.demo import DemoConfig, load_data, lr_at  # noqa: E402
from kd_teacher.engine.model import build_gpt_model  # noqa: E402
from kd_teacher.losses import kd_loss  # noqa: E402
from kd_teacher.offline.packing import bits_for_vocab, packed_row_bytes  # noqa: E402
from kd_teacher.payload import TopKPayload  # noqa: E402
from kd_teacher.runtime import init_distributed  # noqa: E402

PRESETS = {
    # 2 shared CPU cores: < 20 minutes. 17 payloads x 3 seeds of 120 steps x 16 x 64 tokens, in 2 processes of
    # one thread (on a loaded machine a second OpenMP thread spins more than it computes: 10x the CPU time per
    # step, measured), ~23 CPU-minutes in all.
    "cpu": dict(seq_len=64, train_sequences=512, heldout_sequences=64, steps=120, micro_batch_size=16, warmup=12,
                seeds=3, ks=(4, 8, 16, 32, 64), threads=1, workers=2),
    # One H200: 17 payloads x 3 seeds of 300 steps x 32 x 128 tokens; the tiny student is launch-bound there
    # (~10-15 ms a step, estimated, not yet measured): ~4 minutes.
    "gpu": dict(seq_len=128, train_sequences=4096, heldout_sequences=192, steps=300, micro_batch_size=32,
                warmup=15, seeds=3, ks=(4, 8, 16, 32, 64), threads=None, workers=1),
}
ECE_BINS = 15


@dataclass(frozen=True)
class Arm:
    name: str
    family: str  # "topk+tail" | "topk" | "sampled" | "dense" | "ce"
    k: int = 0

    def bytes_per_token(self, vocab: int) -> int:
        if self.family == "ce":
            return 0
        if self.family == "dense":
            return 4 * vocab
        return 4 * self.k + packed_row_bytes(self.k, bits_for_vocab(vocab)) + 4


def arms(ks) -> list[Arm]:
    out = [Arm("CE only", "ce"), Arm("dense", "dense")]
    for k in ks:
        out += [Arm(f"topk+tail {k}", "topk+tail", k), Arm(f"topk {k}", "topk", k), Arm(f"sampled {k}", "sampled", k)]
    return out


# ---- teacher payloads, made once ------------------------------------------------------------------------------
@torch.no_grad()
def logits_of(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """[b, s, V] fp32 logits over the true vocabulary (Megatron's padding columns dropped), no grad."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, None)[..., :vocab].float()


@torch.no_grad()
def make_payloads(teacher, inputs: torch.Tensor, vocab: int, ks, seeds: int, batch: int = 64) -> dict:
    """{("topk", max k): payload, ("sampled", k, seed): payload} over all training sequences."""
    parts: dict = {}
    kmax = max(ks)
    for lo in range(0, inputs.shape[0], batch):
        tokens = inputs[lo:lo + batch]
        logits = logits_of(teacher, tokens, vocab)
        parts.setdefault(("topk", kmax), []).append(TopKPayload.from_logits(logits, kmax, tokens=tokens))
        for k in ks:
            for seed in range(seeds):
                parts.setdefault(("sampled", k, seed), []).append(
                    TopKPayload.from_logits(logits, k, tokens=tokens, extraction="sampled", sample_seed=seed))
    return {key: TopKPayload.cat(p) for key, p in parts.items()}


def topk_prefix(payload: TopKPayload, k: int) -> TopKPayload:
    """The top-k payload of a smaller k: the first k slots (ids are sorted by value, ties by id: exactly what
    vocab_parallel_topk gives for that k)."""
    if k == payload.k:
        return payload
    return TopKPayload(payload.values[..., :k].contiguous(), payload.indices[..., :k].contiguous(), payload.lse,
                       replace(payload.header, k=k))


# ---- training --------------------------------------------------------------------------------------------------
def micro_batch_order(rows: int, mbs: int, steps: int, seed: int) -> list[list[int]]:
    """The rows of each step's micro-batch: epochs in a seeded order, the same for every payload of a seed."""
    gen = torch.Generator().manual_seed(2000 + seed)
    order: list[int] = []
    while len(order) < steps * mbs:
        order += torch.randperm(rows, generator=gen).tolist()[: rows - rows % mbs]
    return [order[i * mbs:(i + 1) * mbs] for i in range(steps)]


def dense_forward_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, vocab: int) -> torch.Tensor:
    logq = F.log_softmax(student_logits[..., :vocab].float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1)


def train(arm: Arm, seed: int, cfg: dict, demo: DemoConfig, data, teacher, payloads: dict, device) -> dict:
    vocab = demo.student.vocab_size
    torch.manual_seed(1000 + seed)
    student, _ = build_gpt_model(demo.student)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=demo.lr, betas=(0.9, 0.98), weight_decay=0.0)
    mbs = cfg["micro_batch_size"]
    order = micro_batch_order(data.train.shape[0], mbs, cfg["steps"], seed)
    payload = None
    if arm.family in ("topk+tail", "topk"):
        payload = topk_prefix(payloads[("topk", max(cfg["ks"]))], arm.k)
    elif arm.family == "sampled":
        payload = payloads[("sampled", arm.k, seed)]
    pos = None
    start, last = time.perf_counter(), float("nan")
    for step in range(cfg["steps"]):
        idx = order[step]
        batch = data.train[idx].to(device)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        if pos is None:
            pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, demo)
        logits = student(tokens, pos, None)
        if arm.family == "ce":
            loss = F.cross_entropy(logits[..., :vocab].reshape(-1, vocab).float(), labels.reshape(-1))
        elif arm.family == "dense":
            t_logp = F.log_softmax(logits_of(teacher, tokens, vocab), dim=-1)
            loss = dense_forward_kl(logits, t_logp, vocab).mean()
        else:
            loss = kd_loss(logits, payload.rows(idx), tail=arm.family != "topk").mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        last = float(loss.detach())
    return dict(student=student, seconds=time.perf_counter() - start, final_train_loss=last)


# ---- held-out evaluation ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, heldout: torch.Tensor, teacher_logp: torch.Tensor, vocab: int, device, batch: int = 32) -> dict:
    """Full-vocabulary KL(teacher || model), cross-entropy of the next token, ECE of the top-1 probability."""
    model.eval()
    kl = ce = 0.0
    conf_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
    acc_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
    count = torch.zeros(ECE_BINS, dtype=torch.float64)
    n = 0
    for lo in range(0, heldout.shape[0], batch):
        rows = heldout[lo:lo + batch].to(device)
        tokens, labels = rows[:, :-1], rows[:, 1:]
        logq = F.log_softmax(logits_of(model, tokens, vocab), dim=-1)
        logp = teacher_logp[lo:lo + batch].to(device)
        kl += float((logp.exp() * (logp - logq)).sum(-1).double().sum())
        ce += float(-logq.gather(-1, labels.unsqueeze(-1)).double().sum())
        conf, pred = logq.exp().max(-1)
        bins = (conf.double() * ECE_BINS).long().clamp(max=ECE_BINS - 1).reshape(-1).cpu()
        conf_sum += torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, bins, conf.double().reshape(-1).cpu())
        acc_sum += torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(
            0, bins, (pred == labels).double().reshape(-1).cpu())
        count += torch.bincount(bins, minlength=ECE_BINS).double()
        n += labels.numel()
    ece = float(((acc_sum - conf_sum).abs()).sum() / n)
    model.train()
    return dict(kl=kl / n, loss=ce / n, ece=ece, tokens=n)


# ---- the study -----------------------------------------------------------------------------------------------
def summarise(runs: dict, arm_list: list[Arm], vocab: int) -> list[dict]:
    rows = []
    for arm in arm_list:
        per_seed = runs[arm.name]
        row = dict(arm=arm.name, family=arm.family, k=arm.k, bytes_per_token=arm.bytes_per_token(vocab))
        for metric in ("kl", "loss", "ece"):
            values = [r[metric] for r in per_seed]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def compare(a: dict, b: dict, runs: dict, metric: str = "kl") -> dict:
    """b - a on `metric`: the difference of the means, the seed-to-seed spread it is judged against, and the
    same per seed (every seed trains all payloads from one initialisation on one data order: paired)."""
    paired = [y[metric] - x[metric] for x, y in zip(runs[a["arm"]], runs[b["arm"]])]
    spread = math.hypot(a[f"{metric}_std"], b[f"{metric}_std"])
    diff = b[metric] - a[metric]
    paired_std = statistics.stdev(paired) if len(paired) > 1 else 0.0
    return dict(diff=diff, spread=spread, exceeds_spread=abs(diff) > 2 * spread, paired=paired,
                paired_consistent=all(d * diff > 0 for d in paired) and abs(diff) > 2 * paired_std)


def advice(rows: list[dict], runs: dict) -> list[str]:
    """Per byte budget: the payload with the lowest held-out KL, and how its lead compares with the spread."""
    by = {r["arm"]: r for r in rows}
    out = []
    for k in sorted({r["k"] for r in rows if r["k"]}):
        cands = sorted([by[f"topk+tail {k}"], by[f"topk {k}"], by[f"sampled {k}"]], key=lambda r: r["kl"])
        best, second = cands[0], cands[1]
        c = compare(best, second, runs)
        if c["exceeds_spread"]:
            verdict = "ahead of"
        elif c["paired_consistent"]:
            verdict = "ahead (on every seed, by more than twice the paired spread, not the unpaired one) of"
        else:
            verdict = "within the seed spread of"
        out.append(f"{best['bytes_per_token']} B/token (k = n = {k}): {best['arm']} (KL {best['kl']:.4f}) is "
                   f"{verdict} {second['arm']} (KL {second['kl']:.4f}, +{c['diff']:.4f}); "
                   f"dense: KL {by['dense']['kl']:.4f}")
    return out


def table(rows: list[dict]) -> list[str]:
    lines = ["| payload | bytes/token | held-out KL(T‖S) | held-out loss | ECE |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["bytes_per_token"], r["family"])):
        lines.append(f"| {r['arm']} | {r['bytes_per_token']:,} | {r['kl']:.3f} ± {r['kl_std']:.3f} | "
                     f"{r['loss']:.3f} ± {r['loss_std']:.3f} | {r['ece']:.4f} ± {r['ece_std']:.4f} |")
    return lines


def plot(path: Path, rows: list[dict], teacher: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"topk+tail": ("tab:blue", "o"), "topk": ("tab:orange", "s"), "sampled": ("tab:green", "^")}
    for ax, metric, label in zip(axes, ("kl", "loss", "ece"), ("held-out KL(teacher || student)",
                                                                 "held-out cross-entropy", "expected calibration error")):
        for family, (color, marker) in styles.items():
            fam = sorted((r for r in rows if r["family"] == family), key=lambda r: r["bytes_per_token"])
            ax.errorbar([r["bytes_per_token"] for r in fam], [r[metric] for r in fam],
                        yerr=[r[f"{metric}_std"] for r in fam], color=color, marker=marker, capsize=3, label=family)
        for family, style in (("dense", "--"), ("ce", ":")):
            ref = next(r for r in rows if r["family"] == family)
            ax.axhline(ref[metric], color="gray", linestyle=style,
                       label="dense teacher (16 KB/token)" if family == "dense" else "CE only")
        if metric in teacher:
            ax.axhline(teacher[metric], color="black", linewidth=0.8, label="teacher itself")
        ax.set(xscale="log", xlabel="payload bytes per token", title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@dataclass
class Setup:
    """What every training run of the study shares: data, the teacher, its payloads, the held-out reference."""

    demo: DemoConfig
    data: object
    teacher: torch.nn.Module
    vocab: int
    device: torch.device
    heldout_logp: torch.Tensor
    payloads: dict


def prepare(cfg: dict) -> Setup:
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    init_distributed(1, 1, seed=0)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    demo = DemoConfig(seq_len=cfg["seq_len"], train_sequences=cfg["train_sequences"],
                      heldout_sequences=cfg["heldout_sequences"], steps=cfg["steps"], warmup=cfg["warmup"],
                      micro_batch_size=cfg["micro_batch_size"])
    from kd_teacher.assets.teacher import build_tiny_teacher

    data = load_data(demo)
    teacher, teacher_cfg, _ = build_tiny_teacher()
    teacher.eval()
    vocab = teacher_cfg.vocab_size
    payloads = make_payloads(teacher, data.train[:, :-1].to(device), vocab, cfg["ks"], cfg["seeds"])
    heldout_logp = torch.cat([F.log_softmax(logits_of(teacher, data.heldout[i:i + 32, :-1].to(device), vocab), -1)
                              for i in range(0, data.heldout.shape[0], 32)]).cpu()
    return Setup(demo, data, teacher, vocab, device, heldout_logp, payloads)


def run_jobs(cfg: dict, jobs: list[tuple[str, int]], with_teacher: bool) -> tuple[list[dict], Optional[dict]]:
    """Train and evaluate each (payload name, seed) of `jobs` (in a worker process, or in this one); with_teacher:
    also the teacher's own held-out numbers."""
    setup = prepare(cfg)
    teacher = None
    if with_teacher:
        teacher = evaluate(setup.teacher, setup.data.heldout, setup.heldout_logp, setup.vocab, setup.device)
        teacher.update(parameters=sum(p.numel() for p in setup.teacher.parameters()), vocab=setup.vocab,
                       device=torch.cuda.get_device_name() if setup.device.type == "cuda"
                       else f"cpu, {torch.get_num_threads()} thread(s) a process")
    by_name = {arm.name: arm for arm in arms(cfg["ks"])}
    out = []
    for name, seed in jobs:
        arm = by_name[name]
        result = train(arm, seed, cfg, setup.demo, setup.data, setup.teacher, setup.payloads, setup.device)
        metrics = evaluate(result["student"], setup.data.heldout, setup.heldout_logp, setup.vocab, setup.device)
        metrics.update(arm=name, seed=seed, train_seconds=result["seconds"], final_train_loss=result["final_train_loss"],
                       student_parameters=sum(p.numel() for p in result["student"].parameters()))
        out.append(metrics)
        print(f"seed {seed} {name:14s} KL {metrics['kl']:.3f} loss {metrics['loss']:.3f} ECE {metrics['ece']:.4f} "
              f"({result['seconds']:.1f} s)", flush=True)
    return out, teacher


def run(preset: str, out: Path, seeds: int | None = None, steps: int | None = None,
        workers: int | None = None) -> dict:
    cfg = dict(PRESETS[preset])
    cfg.update({k: v for k, v in dict(seeds=seeds, steps=steps, workers=workers).items() if v is not None})
    t0 = time.perf_counter()
    arm_list = arms(cfg["ks"])
    jobs = [(arm.name, seed) for seed in range(cfg["seeds"]) for arm in arm_list]
    if cfg["workers"] > 1:  # processes of their own (each prepares the same payloads: they are deterministic)
        import multiprocessing

        shares = [(cfg, jobs[i::cfg["workers"]], i == 0) for i in range(cfg["workers"])]
        with multiprocessing.get_context("spawn").Pool(cfg["workers"]) as pool:
            parts = pool.starmap(run_jobs, shares)
    else:
        parts = [run_jobs(cfg, jobs, True)]
    results = [r for part, _ in parts for r in part]
    teacher_eval = parts[0][1]
    runs: dict = {arm.name: sorted((r for r in results if r["arm"] == arm.name), key=lambda r: r["seed"])
                  for arm in arm_list}
    train_seconds = sum(r["train_seconds"] for r in results)
    student_parameters = results[0]["student_parameters"]
    vocab = teacher_eval["vocab"]
    rows = summarise(runs, arm_list, vocab)
    png = out.with_suffix(".png")
    result = dict(
        benchmark="quality_per_byte", preset=preset, config={**cfg, "ks": list(cfg["ks"])},
        machine=dict(platform=platform.platform(), device=teacher_eval["device"], torch=torch.__version__,
                     workers=cfg["workers"]),
        teacher=teacher_eval,
        student_parameters=student_parameters,
        rows=rows, runs=runs, advice=advice(rows, runs), table=table(rows),
        seconds=dict(train=train_seconds, total=time.perf_counter() - t0),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    result["png"] = str(png) if plot(png, rows, teacher_eval) else None
    out.write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes beside it)")
    ap.add_argument("--seeds", type=int, default=None, help="override the preset's number of seeds (>= 2)")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's training steps (a quick check)")
    ap.add_argument("--workers", type=int, default=None, help="training processes (the cpu preset: 2, one a core)")
    args = ap.parse_args()
    if args.seeds is not None and args.seeds < 2:
        ap.error("--seeds must be >= 2: the table compares differences with the seed-to-seed spread")
    out = args.out or Path(__file__).resolve().parent / "results" / f"quality_per_byte_{args.preset}.json"
    result = run(args.preset, out, args.seeds, args.steps, args.workers)
    t = result["teacher"]
    print(f"\nteacher: held-out KL 0, loss {t['loss']:.3f}, ECE {t['ece']:.4f}; "
          f"{result['seconds']['total']:.0f} s in all; JSON {out}; PNG {result['png']}")
    for line in result["advice"]:
        print("advice:", line)
    print("\n".join(result["table"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
