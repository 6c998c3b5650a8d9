"""On-policy distillation of the embedded tiny teacher, against the same student trained off-policy.

    python examples/onpolicy_kd.py                          # 4-5 minutes on 2 idle CPU cores
    python examples/onpolicy_kd.py steps=40 pretrain.steps=60 out_dir=/tmp/onpolicy   # dotted overrides

1. Pre-training, as `make demo` does (`kd_teacher.demo`): the committed tiny teacher's top-k is dumped over the
   corpus's training split and a 0.9M-parameter student is distilled from the dump (forward KL + CE).
2. Two copies of that student train the same number of steps with the same KD loss (reverse KL over the
   teacher's top-128 + tail, the usual on-policy objective), the same prompts (the first `prompt_tokens` tokens
   of training sequences), optimizer and in-process teacher:
   - on-policy: `OnPolicyIterator` has the student complete each prompt with `new_tokens` tokens through
     Megatron-Core's inference engine, and the KD hook has the teacher score those completions;
   - off-policy: the completions are the corpus's own continuations of the same prompts.
3. Evaluation on held-out prompts (documents nobody trained on): each student samples completions (T = 1, the
   same seed), and the exact full-vocabulary reverse KL(student || teacher) per completion token is averaged.
   On-policy training optimises exactly this quantity, so the on-policy student should reach a lower value.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from kd_teacher import demo
from kd_teacher.config import ConfigError, apply_overrides, from_dict

log = logging.getLogger("onpolicy_kd")


def _pretrain_defaults() -> demo.DemoConfig:
    return demo.DemoConfig(out_dir="runs/onpolicy/pretrain", progress=False)


@dataclass
class ExampleConfig:
    out_dir: str = "runs/onpolicy"
    pretrain: demo.DemoConfig = field(default_factory=_pretrain_defaults)  # `make demo`'s settings
    prompt_tokens: int = 32
    new_tokens: int = 32
    steps: int = 100
    micro_batch_size: int = 16
    lr: float = 1e-3
    # The teacher's top-k for the two arms' KD loss (the pre-training dump keeps `make demo`'s 32). The reverse KL
    # over the top-k plus one tail bucket cannot see how the student spreads its tail mass, which the
    # full-vocabulary evaluation does see: with k = 32 on-policy training barely moved it.
    k: int = 128
    heldout_prompts: int = 64
    seed: int = 1234


# ---- the two arms: one loop, two data iterators ---------------------------------------------------------------------
def _kd_config(cfg: ExampleConfig, on_policy: bool):
    from kd_teacher.hooks.config import InProcessTeacherConfig, KDConfig
    from kd_teacher.onpolicy import OnPolicyConfig

    return KDConfig(
        source="in_process", k=cfg.k, kind="reverse_kl", alpha=1.0, vocab_size=cfg.pretrain.student.vocab_size,
        # The teacher engine is built in code (the committed safetensors teacher) and handed over as the source.
        in_process=InProcessTeacherConfig(config="kd_teacher/assets/tiny_teacher (built in code)"),
        on_policy=OnPolicyConfig(max_new_tokens=cfg.new_tokens, seed=cfg.seed) if on_policy else None,
    ).check()


def off_policy_batches(rows: torch.Tensor, cfg: ExampleConfig):
    """The same prompts as the on-policy arm, completed by the corpus itself, in the same seeded order."""
    from kd_teacher.onpolicy import micro_batch
    from kd_teacher.onpolicy.iterator import PromptOrder

    p, n = cfg.prompt_tokens, cfg.new_tokens
    order = PromptOrder(rows.shape[0], cfg.seed)
    while True:
        picked = rows[order.take(cfg.micro_batch_size)]
        yield micro_batch([(r[:p].tolist(), r[p:p + n].tolist(), [math.nan] * n) for r in picked], p + n, 0)


def train_arm(cfg: ExampleConfig, name: str, pretrained: dict, engine, train_rows: torch.Tensor) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kd_teacher.hooks import wrap_forward_step
    from kd_teacher.hooks.sources import InProcessSource
    from kd_teacher.onpolicy import OnPolicyIterator

    model, optimizer = demo.build_student(cfg.pretrain)
    model.module.load_state_dict(pretrained)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
    kd = _kd_config(cfg, on_policy=name == "on-policy")
    step_fn = wrap_forward_step(demo.forward_step, kd, source=InProcessSource(engine), model=model)
    seq_length = cfg.prompt_tokens + cfg.new_tokens
    if kd.on_policy is not None:
        prompts = train_rows[:, :cfg.prompt_tokens].tolist()
        data = OnPolicyIterator(model, kd.on_policy, prompts=prompts, vocab_size=kd.vocab_size, seq_length=seq_length,
                                micro_batch_size=cfg.micro_batch_size, num_microbatches=1)
    else:
        data = off_policy_batches(train_rows, cfg)
    forward_backward = get_forward_backward_func()
    losses, start = [], time.perf_counter()
    for _ in range(cfg.steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(forward_step_func=step_fn, data_iterator=data, model=[model], num_microbatches=1,
                                   seq_length=seq_length, micro_batch_size=cfg.micro_batch_size, forward_only=False)
        optimizer.step()
        losses.append(demo._report_means(reports)["kd loss"])
    seconds = time.perf_counter() - start
    log.info("%s arm: %d steps in %.1f s, KD loss %.3f -> %.3f", name, cfg.steps, seconds, losses[0], losses[-1])
    return dict(model=model.module, seconds=seconds, kd_loss_first=losses[0], kd_loss_last=losses[-1])


# ---- evaluation: reverse KL on the student's own samples of held-out prompts -----------------------------------------
@torch.no_grad()
def reverse_kl_on_own_samples(student, teacher, prompts: list[list[int]], cfg: ExampleConfig, vocab: int) -> float:
    from kd_teacher.onpolicy import OnPolicyConfig, StudentGenerator

    sampling = OnPolicyConfig(max_new_tokens=cfg.new_tokens, seed=cfg.seed)
    seq_length = cfg.prompt_tokens + cfg.new_tokens
    generator = StudentGenerator(student, sampling, vocab_size=vocab, max_sequence_length=seq_length,
                                 max_batch_size=len(prompts))
    rollout = generator.generate(prompts, seed=cfg.seed + 1)  # held-out sampling: another seed than training's
    tokens = torch.tensor([p + c for p, c in zip(rollout.prompts, rollout.completions)])[:, :-1]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    was_training = student.training
    student.eval()
    s_logp = F.log_softmax(student(tokens, positions, None)[..., :vocab].float(), -1)
    t_logp = F.log_softmax(teacher(tokens, positions, None)[..., :vocab].float(), -1)
    student.train(was_training)
    kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)[:, cfg.prompt_tokens - 1:]  # the completion positions
    return float(kl.double().mean())


def run(cfg: ExampleConfig) -> dict:
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.runtime import init_distributed

    init_distributed(1, 1, seed=cfg.seed)
    pre = cfg.pretrain
    if cfg.prompt_tokens + cfg.new_tokens > pre.seq_len + 1:
        raise ValueError(f"prompt_tokens + new_tokens must be <= pretrain.seq_len + 1 = {pre.seq_len + 1}")
    start = time.perf_counter()
    data = demo.load_data(pre)
    engine, teacher_cfg = demo.build_teacher(pre)
    dump = demo.dump_teacher(pre, engine, teacher_cfg, data)
    student = demo.train_student(pre, "KD", data, dump["dir"])["model"]
    pretrained = {k: v.detach().clone() for k, v in student.state_dict().items() if "_extra_state" not in k}
    pretrain_seconds = time.perf_counter() - start

    heldout = data.heldout[: cfg.heldout_prompts, : cfg.prompt_tokens].tolist()
    vocab = pre.student.vocab_size
    arms_teacher = TeacherEngine(engine.model, teacher_cfg.vocab_size, EngineConfig(k=cfg.k), model_config=teacher_cfg)
    arms = {name: train_arm(cfg, name, pretrained, arms_teacher, data.train) for name in ("on-policy", "off-policy")}
    kl = {"pretrained": reverse_kl_on_own_samples(student, engine.model, heldout, cfg, vocab)}
    for name, arm in arms.items():
        kl[name] = reverse_kl_on_own_samples(arm["model"], engine.model, heldout, cfg, vocab)
    wins = kl["on-policy"] < kl["off-policy"]
    report = dict(
        heldout_reverse_kl=kl, on_policy_wins=wins, pretrain_seconds=pretrain_seconds,
        arms={name: {k: v for k, v in arm.items() if k != "model"} for name, arm in arms.items()},
        heldout_prompts=len(heldout), config=asdict(cfg),
    )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict) -> str:
    kl, cfg = report["heldout_reverse_kl"], report["config"]
    lines = [f"on-policy vs off-policy distillation, {cfg['steps']} steps each from one pre-trained student "
             f"({report['pretrain_seconds']:.0f} s of `make demo`-style pre-training)",
             f"held-out: {report['heldout_prompts']} prompts of {cfg['prompt_tokens']} tokens, {cfg['new_tokens']} "
             "tokens sampled by each student (T = 1)",
             f"  {'student':12s} {'reverse KL(student || teacher) per token':>40s}"]
    for name in ("pretrained", "off-policy", "on-policy"):
        arm = report["arms"].get(name)
        extra = f"   (trained {arm['seconds']:.1f} s)" if arm else ""
        lines.append(f"  {name:12s} {kl[name]:40.4f}{extra}")
    verdict = "beats" if report["on_policy_wins"] else "does NOT beat"
    lines.append(("OK: " if report["on_policy_wins"] else "NOTE: ") + f"the on-policy student {verdict} the off-policy "
                 f"one on its own held-out samples: {kl['on-policy']:.4f} vs {kl['off-policy']:.4f}")
    return "\n".join(lines)


def parse_config(argv: list[str]) -> ExampleConfig:
    # Overrides apply to the defaults, so `pretrain.steps=60` changes one field of the pre-training.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="fields and defaults: ExampleConfig in this file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=40 pretrain.steps=60")
    return from_dict(ExampleConfig, apply_overrides(asdict(ExampleConfig()), parser.parse_args(argv).overrides))


def main(argv: list[str] | None = None) -> int:
    demo._quiet_known_fallback_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron", "kd_teacher.offline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"onpolicy_kd.py: {e}", file=sys.stderr)
        return 2
    report = run(cfg)
    print(format_report(report))
    return 0 if report["on_policy_wins"] else 1


if __name__ == "__main__":
    sys.exit(main())
