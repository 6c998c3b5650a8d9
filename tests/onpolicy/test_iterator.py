"""The on-policy data iterator with the KD hook and an in-process teacher, through Megatron-Core's schedule on
real gloo ranks (two data-parallel ranks): micro-batches hold prompt + the student's completion with the loss
mask on the completion only; the reported KD loss equals `kd_loss` by hand on the same logits and payload; the
log-prob gap report is there and tiny in fp32; same seed and prompts give the same micro-batches; lmbda mixes
in the dataset's micro-batches; bad input fails before the first step; a failing teacher fails the step."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from kd_teacher.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TEACHER_YAML = str(ROOT / "configs" / "kd_teacher_tiny.yaml")  # random teacher, true vocabulary 1000
VOCAB, SEQ, MBS, K, EOS = 1000, 16, 3, 16, 2
PROMPTS = [[10 + i, 20 + i, 30 + i, 40 + i][: 2 + i % 3] for i in range(12)]  # 2 to 4 tokens


def _kd_config(**on_policy):
    from kd_teacher.hooks.config import InProcessTeacherConfig, KDConfig
    from kd_teacher.onpolicy import OnPolicyConfig

    settings = dict(max_new_tokens=6, eos_id=EOS, generate_every=2, seed=5)
    settings.update(on_policy)
    return KDConfig(source="in_process", k=K, kind="reverse_kl", alpha=0.5, vocab_size=VOCAB,
                    in_process=InProcessTeacherConfig(config=TEACHER_YAML, allow_random_weights=True),
                    on_policy=OnPolicyConfig(**settings)).check()


def _student():
    from kd_teacher.engine.model import ModelConfig, build_gpt_model

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                      vocab_size=VOCAB, max_sequence_length=64, make_vocab_size_divisible_by=128, seed=3)
    torch.manual_seed(cfg.seed)
    return build_gpt_model(cfg)[0].train()


def _iterator(model, kd, **kw):
    from kd_teacher.onpolicy import OnPolicyIterator

    return OnPolicyIterator(model, kd.on_policy, prompts=kw.pop("prompts", PROMPTS), vocab_size=VOCAB, seq_length=SEQ,
                            micro_batch_size=MBS, num_microbatches=2, **kw)


def _check_rows(batch) -> list:
    """Per row: the prompt and completion the micro-batch encodes, checking its layout on the way."""
    rows = []
    for tokens, labels, mask, lps in zip(batch["tokens"], batch["labels"], batch["loss_mask"],
                                         batch["sampling_logprobs"]):
        n = int(mask.sum())  # completion length
        first = int(mask.nonzero()[0])  # position whose label is the first completion token
        assert mask[first:first + n].eq(1).all() and mask.sum() == n  # one block, completion labels only
        prompt = tokens[: first + 1].tolist()
        completion = labels[first:first + n].tolist()
        assert torch.equal(labels[: first + n - 1], tokens[1: first + n])  # labels are tokens shifted by one
        assert prompt in PROMPTS and 1 <= n <= 6 and all(t < VOCAB for t in completion)
        assert n == 6 or completion[-1] == EOS  # stopped at EOS or at max_new_tokens
        finite = torch.isfinite(lps)
        assert not finite[:first].any() and not finite[first + n:].any()  # nothing on prompt or padding
        assert finite[first:first + n - (completion[-1] == EOS)].all()
        rows.append((prompt, completion))
    return rows


def _run_steps():
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kd_teacher.demo import forward_step
    from kd_teacher.hooks import wrap_forward_step
    from kd_teacher.losses import kd_loss

    model, kd = _student(), _kd_config()
    step = wrap_forward_step(forward_step, kd, model=model)
    data = _iterator(model, kd)
    batches = [next(data) for _ in range(4)]  # one round: generate_every=2 steps x 2 micro-batches
    assert data.rounds == 1
    rows = [r for b in batches for r in _check_rows(b)]
    again = _iterator(model, kd)  # same seed and prompts: the same micro-batches
    same = all(torch.equal(a[k], b[k]) for a, b in zip(batches, [next(again) for _ in range(4)])
               for k in ("tokens", "loss_mask"))

    reports = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(batches[:2]), model=[model], num_microbatches=2, seq_length=SEQ,
        micro_batch_size=MBS, forward_only=True)
    hand = []
    with torch.no_grad():
        for batch in batches[:2]:
            logits = model(batch["tokens"], batch["position_ids"], None)
            payload = step.source.score(batch["tokens"])
            loss = kd_loss(logits, payload, kind="reverse_kl", loss_mask=batch["loss_mask"], vocab_size=VOCAB)
            hand.append((float(loss.sum()), float(batch["loss_mask"].sum()),
                         int(torch.isfinite(batch["sampling_logprobs"]).sum())))
    step.close()
    as_lists = [{k: v.tolist() for k, v in r.items()} for r in reports]
    return dict(rows=rows, same=same, reports=as_lists, hand=hand, dp_rank=parallel_state.get_data_parallel_rank())


def test_micro_batches_masks_kd_loss_and_gap_report():
    results = run_distributed(_run_steps, 2, tp=1)
    prompts_seen = []
    for r in results:
        assert r["same"]
        for report, (kd_sum, count, sampled) in zip(r["reports"], r["hand"]):
            assert report["kd loss"][1] == count
            assert report["kd loss"][0] == pytest.approx(kd_sum, rel=1e-5)
            gap_sum, gap_count = report["onpolicy logprob gap"]
            assert gap_count == sampled > 0 and gap_sum / gap_count < 1e-5  # fp32: rounding only
            assert report["onpolicy logprob gap max"][1] == 1.0 and report["onpolicy logprob gap max"][0] < 1e-4
        prompts_seen.append([tuple(p) for p, _ in r["rows"]])
    # Each data-parallel rank draws its own share of the seeded prompt order: 12 prompts, 12 rows per rank.
    assert sorted(prompts_seen[0] + prompts_seen[1]) == sorted(tuple(p) for p in PROMPTS * 2)


def _mixing_and_failures():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kd_teacher.config import ConfigError
    from kd_teacher.demo import forward_step
    from kd_teacher.hooks import wrap_forward_step
    from kd_teacher.hooks.sources import InProcessSource, make_teacher_source
    from kd_teacher.onpolicy import micro_batch
    from kd_teacher.payload import PayloadError

    model = _student()
    out = {}
    # lmbda: a seeded share of micro-batches comes from the dataset iterator, in its own order.
    dataset = [micro_batch([([7, 8], [9, 10], [math.nan] * 2)] * MBS, SEQ, 0) for _ in range(8)]
    for tag in ("a", "b"):
        data = _iterator(model, _kd_config(lmbda=0.5), off_policy=iter(dataset))
        served = [next(data) for _ in range(8)]
        out[tag] = ["sampling_logprobs" in b and torch.isfinite(b["sampling_logprobs"]).any().item() for b in served]
        off = [b for b in served if not torch.isfinite(b["sampling_logprobs"]).any()]
        assert all(x is y for x, y in zip(off, dataset))  # the dataset's micro-batches, first ones first
    # Bad input, all before the first step.
    errors = {}
    for name, call in {
        "empty": lambda: _iterator(model, _kd_config(), prompts=[[5, 6], []]),
        "too_long": lambda: _iterator(model, _kd_config(), prompts=[[5] * 11]),
        "out_of_vocab": lambda: _iterator(model, _kd_config(), prompts=[[5, VOCAB]]),
        "no_dataset": lambda: _iterator(model, _kd_config(lmbda=0.5)),
        "batch_invariant": lambda: _iterator(model, _kd_config(batch_invariant=True)),  # megatron-core 0.16, CPU
        "vocab_mismatch": lambda: wrap_forward_step(forward_step, dataclasses.replace(_kd_config(), vocab_size=900),
                                                    model=model),
    }.items():
        try:
            call()
            errors[name] = None
        except (ConfigError, PayloadError) as e:
            errors[name] = str(e)
    out["errors"] = errors

    # A teacher that fails mid-run fails the step with its own error.
    class FailsOnSecondCall(InProcessSource):
        calls = 0

        def score(self, tokens, **kw):
            FailsOnSecondCall.calls += 1
            if FailsOnSecondCall.calls == 2:
                raise RuntimeError("teacher server went away (injected)")
            return super().score(tokens, **kw)

    kd = _kd_config()
    step = wrap_forward_step(forward_step, kd, source=FailsOnSecondCall(make_teacher_source(kd).engine), model=model)
    data = _iterator(model, kd)
    try:
        for _ in range(2):
            get_forward_backward_func()(forward_step_func=step, data_iterator=data, model=[model], num_microbatches=1,
                                        seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        out["mid_run"] = None
    except RuntimeError as e:
        out["mid_run"] = str(e)
    return out


def test_lmbda_mixing_bad_input_and_a_failing_teacher():
    out = run_distributed(_mixing_and_failures, 1)[0]
    assert out["a"] == out["b"] and any(out["a"]) and not all(out["a"])  # seeded, and really mixed
    errors = out["errors"]
    assert "prompt 1 is empty" in errors["empty"]
    assert "prompt 0 has 11 tokens" in errors["too_long"] and "context of 16" in errors["too_long"]
    assert "outside the student's vocabulary of 1000" in errors["out_of_vocab"]
    assert "pass its iterator as off_policy=" in errors["no_dataset"]
    assert "batch_invariant" in errors["batch_invariant"] and ("no batch-invariant mode" in errors["batch_invariant"]
                                                               or "no CUDA device" in errors["batch_invariant"])
    assert "vocab_size" in errors["vocab_mismatch"] and "must share a tokenizer" in errors["vocab_mismatch"]
    assert "teacher server went away (injected)" in out["mid_run"]


def test_offline_teacher_is_refused_for_on_policy(tmp_path):
    from kd_teacher.config import ConfigError
    from kd_teacher.hooks.config import load_kd_config

    path = tmp_path / "kd.yaml"
    path.write_text(json.dumps({"kd": {"source": "offline", "k": 8, "offline": {"dir": str(tmp_path)},
                                       "on_policy": {"max_new_tokens": 4}}}))
    with pytest.raises(ConfigError, match="offline teacher dump .* cannot score the student's new samples"):
        load_kd_config(path)
    path.write_text(json.dumps({"kd": {"source": "offline", "k": 8, "offline": {"dir": str(tmp_path)},
                                       "on_policy": {"max_new_tokens": 0}}}))
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        load_kd_config(path)


def test_prompts_file_is_found_beside_the_yaml_and_checked(tmp_path):
    from kd_teacher.config import ConfigError
    from kd_teacher.hooks.config import load_kd_config
    from kd_teacher.onpolicy import check_prompts, load_prompts

    (tmp_path / "prompts.jsonl").write_text('[5, 6, 7]\n{"tokens": [8, 9]}\n')
    (tmp_path / "kd.yaml").write_text(json.dumps({"kd": {
        "source": "in_process", "k": 8, "in_process": {"config": TEACHER_YAML},
        "on_policy": {"prompts": "prompts.jsonl", "max_new_tokens": 4}}}))
    cfg = load_kd_config(tmp_path / "kd.yaml")
    assert cfg.on_policy.prompts == str(tmp_path / "prompts.jsonl")
    prompts = load_prompts(cfg.on_policy.prompts)
    assert prompts == [[5, 6, 7], [8, 9]]
    check_prompts(prompts, vocab_size=VOCAB, seq_length=7, max_new_tokens=4)
    with pytest.raises(ConfigError, match="prompt 0 has 3 tokens; with max_new_tokens=4 it needs 7"):
        check_prompts(prompts, vocab_size=VOCAB, seq_length=6, max_new_tokens=4)
    (tmp_path / "prompts.jsonl").write_text('[5, 6, 7]\n[]\n')
    with pytest.raises(ConfigError, match="prompts.jsonl:2: expected a non-empty list of token ids"):
        load_prompts(cfg.on_policy.prompts)
