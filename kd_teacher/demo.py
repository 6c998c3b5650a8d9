"""`make demo`: distil the embedded tiny teacher into a small student on a CPU, against a CE-only twin.

    python -m kd_teacher.demo                    # the full demo (a few minutes on 2 CPU cores)
    python -m kd_teacher.demo steps=100 out_dir=/tmp/demo   # dotted overrides of DemoConfig

The data path is the product's, as a user would run it:
  data      the committed CPython corpus, tokenized by the committed BPE tokenizer; a training split drawn
            from the teacher's train documents, a held-out split of documents nobody trained on
  dump      the offline dump (`kd_teacher.offline`: the same `run_dump` as `kd-teacher dump`, JSONL data
            source) of the teacher's top-k over the training split
  students  two Megatron-Core GPTModels of one shape from one initialisation, trained for the same steps on
            the same micro-batches with Megatron's DDP, optimizer and pipeline schedule; one plain
            (cross-entropy `forward_step`), one with that same `forward_step` wrapped by
            `kd_teacher.hooks.wrap_forward_step` and the dump as its offline teacher
  report    held-out loss and perplexity of teacher and students, full-vocabulary KL(teacher || student),
            top-1 agreement, dump and training tokens/s; a PNG of the curves; sampled text from all three
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from kd_teacher import assets
from kd_teacher.config import ConfigError, apply_overrides, from_dict
from kd_teacher.engine.model import ModelConfig

log = logging.getLogger("kd_teacher.demo")


def _student_shape() -> ModelConfig:
    # ~0.9M parameters: a quarter of the teacher, cheap enough to train twice in a couple of CPU minutes.
    return ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=384, vocab_size=4096, max_sequence_length=256,
                       make_vocab_size_divisible_by=128, share_embeddings_and_output_weights=True, seed=4321)


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    seq_len: int = 128
    train_sequences: int = 1024  # the dumped training split: 1024 x 128 = 131k tokens, ~4.7 epochs
    heldout_sequences: int = 192
    k: int = 32
    temperature: float = 1.0
    alpha: float = 0.8  # KD student: 0.8 KD + 0.2 cross-entropy
    steps: int = 300
    micro_batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    eval_every: int = 50
    seed: int = 1234
    sample_tokens: int = 40
    prompts: list[str] = field(default_factory=lambda: [
        "def __init__(self", "import os\nimport sys\n\n", "The with statement",
    ])
    progress: bool = True
    student: ModelConfig = field(default_factory=_student_shape)


# ---- data -----------------------------------------------------------------------------------------------------
@dataclass
class DemoData:
    tokenizer: object
    train: torch.Tensor  # [n, seq_len + 1]: inputs are [:, :-1], labels [:, 1:]
    heldout: torch.Tensor


def load_data(cfg: DemoConfig) -> DemoData:
    tok = assets.load_tokenizer()
    docs = assets.read_corpus()
    train = assets.split_sequences("train", cfg.seq_len, tok, docs)
    heldout = assets.split_sequences("heldout", cfg.seq_len, tok, docs, max_sequences=cfg.heldout_sequences)
    # A random draw of the teacher's training sequences, the same on every run.
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.train_sequences > train.shape[0]:
        raise ConfigError(f"train_sequences={cfg.train_sequences}: the train split has {train.shape[0]} "
                          f"sequences of {cfg.seq_len} tokens")
    return DemoData(tok, train[order[: cfg.train_sequences]], heldout)


# ---- the teacher and its offline dump ---------------------------------------------------------------------------
def build_teacher(cfg: DemoConfig):
    from kd_teacher.assets.teacher import build_tiny_teacher
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine

    model, model_cfg, _ = build_tiny_teacher()
    engine_cfg = EngineConfig(k=cfg.k, temperature=cfg.temperature, max_tokens_per_batch=16 * cfg.seq_len)
    engine = TeacherEngine(model, model_cfg.vocab_size, engine_cfg, model_config=model_cfg)
    return engine, model_cfg


def _check_dump_dir(path: Path) -> None:
    """A previous demo's dump may be replaced; anything else at that path is left alone and refused."""
    if path.exists() and not (path / "manifest.json").is_file():
        raise ConfigError(f"{path} exists and is not a teacher dump: choose another out_dir")


def _fresh_dump_dir(path: Path) -> None:
    _check_dump_dir(path)
    if path.exists():
        shutil.rmtree(path)


def dump_teacher(cfg: DemoConfig, engine, model_cfg, data: DemoData) -> dict:
    from kd_teacher.engine.loading import TeacherConfig
    from kd_teacher.offline.data import DataConfig, TokenizerConfig
    from kd_teacher.offline.writer import DumpConfig, OutputConfig, run_dump

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "train_tokens.jsonl"
    jsonl.write_text("".join(json.dumps(row[:-1].tolist()) + "\n" for row in data.train))
    dump_dir = out / "dump"
    _fresh_dump_dir(dump_dir)
    tokenizer = TokenizerConfig(vocab_size=model_cfg.vocab_size, eod=data.tokenizer.token_to_id(assets.EOD_TOKEN),
                                name=assets.tokenizer_id())
    dump_cfg = DumpConfig(
        teacher=TeacherConfig(model=model_cfg, engine=engine.config),
        data=DataConfig(kind="jsonl", path=str(jsonl), tokenizer=tokenizer),
        output=OutputConfig(dir=str(dump_dir), progress=cfg.progress),
    )
    start = time.perf_counter()
    manifest = run_dump(dump_cfg, engine=engine)
    seconds = time.perf_counter() - start
    return dict(dir=str(dump_dir), samples=manifest.num_samples, tokens=manifest.total_tokens,
                bytes=manifest.total_bytes, seconds=seconds, tokens_per_s=manifest.total_tokens / seconds,
                k=manifest.k)


# ---- the students: one user forward_step, Megatron DDP + optimizer + schedule ------------------------------------
def micro_batches(rows: torch.Tensor, micro_batch_size: int, seed: int):
    """Megatron-style micro-batch dicts, epoch after epoch in a seeded order (the same for both students)."""
    gen = torch.Generator().manual_seed(seed)
    s = rows.shape[1] - 1
    position_ids = torch.arange(s).expand(micro_batch_size, s)
    while True:
        order = torch.randperm(rows.shape[0], generator=gen)
        for i in range(0, rows.shape[0] - micro_batch_size + 1, micro_batch_size):
            chunk = rows[order[i:i + micro_batch_size]]
            yield {"tokens": chunk[:, :-1], "labels": chunk[:, 1:], "position_ids": position_ids,
                   "loss_mask": torch.ones(micro_batch_size, s)}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.clone().detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    """The user's forward_step, as in Megatron-LM's pretrain_gpt.py: the data iterator yields host tensors,
    which go to the model's device without a host wait (get_batch's `.cuda(non_blocking=True)`); the model
    computes CE from labels."""
    device = next(model.parameters()).device
    batch = {key: value.to(device, non_blocking=True) for key, value in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def build_student(cfg: DemoConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from kd_teacher.engine.model import build_gpt_model

    torch.manual_seed(cfg.student.seed)  # the same seed: both students start from the same weights
    model, tconfig = build_gpt_model(cfg.student)
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.lr, weight_decay=0.0, clip_grad=1.0, adam_beta2=0.98,
                        params_dtype=tconfig.params_dtype),
        [model],
    )
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model.no_sync
    return model, optimizer


def lr_at(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _report_means(reports: list[dict]) -> dict:
    out = {}
    for key in reports[0] if reports else []:
        total = torch.stack([r[key].float().reshape(2) for r in reports]).sum(0)
        out[key] = float(total[0] / total[1].clamp(min=1))
    return out


def train_student(cfg: DemoConfig, name: str, data: DemoData, kd_dump: str | None) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, optimizer = build_student(cfg)
    step_fn = forward_step
    if kd_dump is not None:
        from kd_teacher.hooks import wrap_forward_step
        from kd_teacher.hooks.config import KDConfig, OfflineTeacherConfig

        kd = KDConfig(source="offline", k=cfg.k, temperature=cfg.temperature, alpha=cfg.alpha,
                      vocab_size=cfg.student.vocab_size, offline=OfflineTeacherConfig(dir=kd_dump))
        step_fn = wrap_forward_step(forward_step, kd, model=model)  # the one line KD adds
    batches = micro_batches(data.train, cfg.micro_batch_size, cfg.seed)
    forward_backward = get_forward_backward_func()
    curve = {"step": [], "heldout_loss": [], "train_step": [], "train_ce": [], "train_kd": []}
    train_seconds = 0.0
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve["step"].append(step)
            curve["heldout_loss"].append(heldout_ce(model, data.heldout))
            log.info("%s student: step %d, held-out loss %.3f", name, step, curve["heldout_loss"][-1])
        if step == cfg.steps:
            break
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=step_fn, data_iterator=batches, model=[model], num_microbatches=1,
            seq_length=cfg.seq_len, micro_batch_size=cfg.micro_batch_size, forward_only=False,
        )
        optimizer.step()
        train_seconds += time.perf_counter() - start
        means = _report_means(reports)
        curve["train_step"].append(step)
        curve["train_ce"].append(means["lm loss"])
        curve["train_kd"].append(means.get("kd loss"))
    if kd_dump is not None:
        step_fn.close()
    tokens = cfg.steps * cfg.micro_batch_size * cfg.seq_len
    return dict(name=name, model=model.module, curve=curve, train_seconds=train_seconds,
                tokens_per_s=tokens / max(train_seconds, 1e-9))


# ---- held-out evaluation ----------------------------------------------------------------------------------------
def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).expand_as(tokens)


@torch.no_grad()
def heldout_ce(model, rows: torch.Tensor, batch: int = 32) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch):
        chunk = rows[i:i + batch]
        loss = model(chunk[:, :-1], _positions(chunk[:, :-1]), None, labels=chunk[:, 1:])
        total += float(loss.double().sum())
        count += loss.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def _log_probs(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full-vocabulary log-probs [b, s, V] over the true vocabulary (Megatron's padding columns dropped)."""
    logits = model(tokens, _positions(tokens), None)  # [b, s, V_padded] without labels
    return F.log_softmax(logits[..., :vocab].float(), dim=-1)


@torch.no_grad()
def compare_on_heldout(teacher, students: dict, rows: torch.Tensor, vocab: int, batch: int = 16) -> dict:
    """Held-out loss of every model, and each student's exact KL(teacher || student) and top-1 agreement."""
    models = {"teacher": teacher, **students}
    for m in models.values():
        m.eval()
    sums = {name: {"loss": 0.0, "kl": 0.0, "top1": 0.0} for name in models}
    count = 0
    for i in range(0, rows.shape[0], batch):
        tokens, labels = rows[i:i + batch, :-1], rows[i:i + batch, 1:]
        t_logp = _log_probs(teacher, tokens, vocab)
        t_top1 = t_logp.argmax(-1)
        for name, m in models.items():
            logp = t_logp if m is teacher else _log_probs(m, tokens, vocab)
            sums[name]["loss"] += float(-logp.gather(-1, labels.unsqueeze(-1)).double().sum())
            if m is not teacher:
                sums[name]["kl"] += float((t_logp.exp() * (t_logp - logp)).sum(-1).double().sum())
                sums[name]["top1"] += float((logp.argmax(-1) == t_top1).double().sum())
        count += labels.numel()
    out = {}
    for name, s in sums.items():
        loss = s["loss"] / count
        out[name] = {"loss": loss, "perplexity": math.exp(loss)}
        if name != "teacher":
            out[name].update(kl_from_teacher=s["kl"] / count, top1_agreement=s["top1"] / count)
    out["tokens"] = count
    return out


# ---- text samples -------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, new_tokens: int, seed: int, max_len: int) -> str:
    """Top-40 sampling at temperature 1, recomputing the whole context each token (tiny models, no KV cache).
    (Lower temperatures send a model this small into loops of one repeated word.)"""
    model.eval()
    ids = tokenizer.encode(prompt).ids
    gen = torch.Generator().manual_seed(seed)
    for _ in range(new_tokens):
        context = torch.tensor([ids[-max_len:]])
        logits = model(context, _positions(context), None)[0, -1, : tokenizer.get_vocab_size()].float()
        top = torch.topk(logits, 40)
        choice = torch.multinomial(F.softmax(top.values, -1), 1, generator=gen)
        ids.append(int(top.indices[choice]))
    return tokenizer.decode(ids)


# ---- outputs --------------------------------------------------------------------------------------------------------
def plot_curves(path: Path, results: list[dict], teacher_loss: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_held) = plt.subplots(1, 2, figsize=(11, 4))
    for r, color in zip(results, ("tab:blue", "tab:orange")):
        c = r["curve"]
        ax_train.plot(c["train_step"], _smooth(c["train_ce"]), color=color, label=f"{r['name']} student")
        ax_held.plot(c["step"], c["heldout_loss"], marker="o", color=color, label=f"{r['name']} student")
    ax_held.axhline(teacher_loss, color="gray", linestyle="--", label="teacher")
    ax_train.set(title="training cross-entropy (smoothed)", xlabel="step", ylabel="loss")
    ax_held.set(title="held-out cross-entropy", xlabel="step", ylabel="loss")
    for ax in (ax_train, ax_held):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-window:]
        out.append(sum(acc) / len(acc))
    return out


def verdict(held: dict) -> tuple[bool, str]:
    kd, ce = held["KD"], held["CE-only"]
    wins_kl = kd["kl_from_teacher"] < ce["kl_from_teacher"]
    wins_loss = kd["loss"] < ce["loss"]
    ok = wins_kl and wins_loss
    text = (f"KD student {'beats' if ok else 'does NOT beat'} the CE-only student: held-out KL(teacher||student) "
            f"{kd['kl_from_teacher']:.3f} vs {ce['kl_from_teacher']:.3f} ({'lower' if wins_kl else 'NOT lower'}), "
            f"held-out loss {kd['loss']:.3f} vs {ce['loss']:.3f} ({'lower' if wins_loss else 'NOT lower'})")
    return ok, text


def format_report(report: dict) -> str:
    d, held = report["dump"], report["heldout"]
    lines = [
        f"kd-teacher demo: tiny teacher ({report['teacher_parameters'] / 1e6:.1f}M params) -> two students "
        f"({report['student_parameters'] / 1e6:.2f}M params, same init, same {report['steps']} steps x "
        f"{report['tokens_per_step']} tokens)",
        f"dump     {d['samples']} sequences, {d['tokens']:,} tokens, k={d['k']}, {d['bytes'] / 1e6:.1f} MB in "
        f"{d['seconds']:.1f} s ({d['tokens_per_s']:,.0f} tokens/s) -> {d['dir']}",
    ]
    for name in ("CE-only", "KD"):
        t = report["training"][name]
        lines.append(f"train    {name:8s} student: {t['seconds']:.1f} s ({t['tokens_per_s']:,.0f} tokens/s)")
    lines += [f"held-out {held['tokens']:,} tokens of documents no model trained on:",
              f"  {'model':10s} {'loss':>7s} {'ppl':>8s} {'KL(T||S)':>9s} {'top-1 agree':>12s}"]
    for name in ("teacher", "KD", "CE-only"):
        h = held[name]
        kl = f"{h['kl_from_teacher']:9.3f}" if "kl_from_teacher" in h else f"{'-':>9s}"
        top1 = f"{100 * h['top1_agreement']:11.1f}%" if "top1_agreement" in h else f"{'-':>12s}"
        lines.append(f"  {name:10s} {h['loss']:7.3f} {h['perplexity']:8.1f} {kl} {top1}")
    lines.append(("OK: " if report["kd_wins"] else "NOTE: ") + report["verdict"])
    lines.append(f"curves   {report['curves_png']}")
    for prompt, samples in report["samples"].items():
        lines.append(f"samples for prompt {prompt!r}:")
        for name, text in samples.items():
            shown = text[len(prompt):].replace("\n", "\\n")[:110]
            lines.append(f"  {name:8s}| {prompt.replace(chr(10), chr(92) + 'n')}{shown}")
    return "\n".join(lines)


# ---- the whole demo ------------------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig) -> dict:
    from kd_teacher.runtime import init_distributed

    init_distributed(1, 1, seed=cfg.seed)
    if cfg.student.vocab_size != 4096 or cfg.seq_len > cfg.student.max_sequence_length:
        raise ConfigError("student.vocab_size must be the tokenizer's 4096 and seq_len <= student.max_sequence_length")
    out = Path(cfg.out_dir)
    _check_dump_dir(out / "dump")  # before minutes of work, not after
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg)
    engine, teacher_cfg = build_teacher(cfg)
    log.info("dumping the teacher's top-%d over %d training sequences", cfg.k, data.train.shape[0])
    dump = dump_teacher(cfg, engine, teacher_cfg, data)
    results = [train_student(cfg, "CE-only", data, None), train_student(cfg, "KD", data, dump["dir"])]
    students = {r["name"]: r["model"] for r in results}
    held = compare_on_heldout(engine.model, students, data.heldout, teacher_cfg.vocab_size)
    ok, text = verdict(held)
    png = out / "curves.png"
    plot_curves(png, results, held["teacher"]["loss"])
    models = {"teacher": engine.model, **students}
    samples = {p: {name: sample_text(m, data.tokenizer, p, cfg.sample_tokens, cfg.seed, cfg.seq_len)
                   for name, m in models.items()} for p in cfg.prompts}
    report = dict(
        teacher_parameters=sum(p.numel() for p in engine.model.parameters()),
        student_parameters=sum(p.numel() for p in students["KD"].parameters()),
        steps=cfg.steps, tokens_per_step=cfg.micro_batch_size * cfg.seq_len, dump=dump,
        training={r["name"]: {"seconds": r["train_seconds"], "tokens_per_s": r["tokens_per_s"], "curve": r["curve"]}
                  for r in results},
        heldout=held, kd_wins=ok, verdict=text, curves_png=str(png), samples=samples,
        config=asdict(cfg),
    )
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def parse_config(argv: list[str]) -> DemoConfig:
    # Overrides apply to the defaults, so `student.hidden_size=64` changes one field of the student shape.
    return from_dict(DemoConfig, apply_overrides(asdict(DemoConfig()), argv))


def _quiet_known_fallback_warnings() -> None:
    """Megatron-Core announces on import that it falls back from Apex/Transformer Engine to torch: expected on a
    CPU, and a screenful of it would bury the demo's report. Other warnings still show."""
    for text in ("Apex is not installed", "Transformer Engine and Apex are not installed", "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{text}")


def main(argv: list[str] | None = None) -> int:
    _quiet_known_fallback_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron", "kd_teacher.offline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        start = time.perf_counter()
        report = run_demo(cfg)
    except (ConfigError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    print(format_report(report))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; full report: {Path(cfg.out_dir) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
