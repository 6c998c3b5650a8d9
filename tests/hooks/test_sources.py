"""Teacher sources behind one interface: the in-process teacher and an offline dump of the same teacher give
identical losses through the wrapped forward_step (also when payloads are read ahead); a KD config that
contradicts the run is refused at start-up with an error naming the problem."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from kd_teacher.config import ConfigError
from kd_teacher.hooks.config import KDConfig, as_kd_config, load_kd_config
from kd_teacher.testing.distributed import run_distributed
from tests.hooks.test_forward_step import (
    K, MBS, SEQ, TEACHER_YAML, VOCAB, forward_step, kd_config, micro_batches, student_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _dump(engine, batches, tmp):
    """An offline dump of exactly these sequences, written by `kd-teacher dump`'s own writer."""
    from kd_teacher.config import from_dict
    from kd_teacher.offline.writer import DumpConfig, run_dump

    rows = Path(tmp) / "rows.jsonl"
    rows.write_text("".join(json.dumps(r.tolist()) + "\n" for b in batches for r in b["tokens"]))
    teacher = json.loads(json.dumps({"model": asdict(engine.model_config), "engine": {"k": K}}))
    cfg = from_dict(DumpConfig, {"teacher": teacher, "data": {"kind": "jsonl", "path": str(rows)},
                                 "output": {"dir": str(Path(tmp) / "dump"), "progress": False}})
    run_dump(cfg, engine=engine)
    return str(Path(tmp) / "dump")


def _run(step, model, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reports = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=SEQ, micro_batch_size=MBS, forward_only=True,
    )
    return [{k: v.tolist() for k, v in r.items()} for r in reports]


def _in_process_vs_offline(tmp):
    import torch

    from kd_teacher.engine.model import build_gpt_model
    from kd_teacher.hooks import make_teacher_source, wrap_forward_step
    from kd_teacher.hooks.config import OfflineTeacherConfig

    torch.manual_seed(5)
    cfg = student_config(tp=2)
    model, _ = build_gpt_model(cfg)
    batches = micro_batches(3, seed=11)
    kd = kd_config(tp=2, alpha=0.6)
    in_process = make_teacher_source(kd)
    directory = _dump(in_process.engine, batches, tmp)
    offline_kd = KDConfig(source="offline", k=K, alpha=0.6, vocab_size=VOCAB,
                          offline=OfflineTeacherConfig(dir=directory)).check()
    results = {}
    results["in_process"] = _run(wrap_forward_step(forward_step, kd, source=in_process, model=model), model, batches)
    results["offline"] = _run(wrap_forward_step(forward_step, offline_kd, model=model), model, batches)
    results["offline_read_ahead"] = _run(
        wrap_forward_step(forward_step, offline_kd, model=model, read_ahead=True), model, batches)
    # A sequence the dump lacks, with missing: ce_only: no KD term for it, counted in the report.
    lenient = KDConfig(source="offline", k=K, alpha=0.6, vocab_size=VOCAB,
                       offline=OfflineTeacherConfig(dir=directory, missing="ce_only")).check()
    other = micro_batches(1, seed=999)
    other[0]["tokens"][0] = batches[0]["tokens"][0]  # row 0 is in the dump, row 1 is not
    results["partial"] = _run(wrap_forward_step(forward_step, lenient, model=model), model, other)
    return results


def test_in_process_and_offline_sources_give_identical_losses(tmp_path):
    results = run_distributed(_in_process_vs_offline, 2, str(tmp_path), tp=2)
    for r in results:
        assert r["in_process"] == r["offline"]  # bitwise: every report entry of every micro-batch
        assert r["offline"] == r["offline_read_ahead"]
        assert all(m["kd loss"][0] > 0 for m in r["in_process"])
        partial = r["partial"][0]
        covered, loss_tokens = partial["kd teacher coverage"]
        assert 0 < covered < loss_tokens == partial["lm loss"][1] == partial["kd loss"][1]  # row 0 only


# ---- start-up errors ------------------------------------------------------------------------------------------
def _startup_errors(tmp):
    from kd_teacher.engine.loading import build_engine, load_teacher_config
    from kd_teacher.hooks import make_teacher_source, wrap_forward_step
    from kd_teacher.hooks.config import OfflineTeacherConfig
    from kd_teacher.hooks.sources import InProcessSource

    errors = {}

    def expect_error(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            errors[name] = f"{type(e).__name__}: {e}"
        else:
            errors[name] = None

    kd = kd_config(tp=2)
    tp_mismatch = kd_config(tp=2)
    tp_mismatch.in_process.overrides = ["model.tensor_model_parallel_size=1"]
    expect_error("teacher_tp", lambda: make_teacher_source(tp_mismatch))
    no_ckpt = kd_config(tp=2)
    no_ckpt.in_process.checkpoint = str(Path(tmp) / "no_such_checkpoint")
    expect_error("checkpoint", lambda: make_teacher_source(no_ckpt))
    random = kd_config(tp=2)
    random.in_process.allow_random_weights = False
    expect_error("random", lambda: make_teacher_source(random))
    wrong_vocab = kd_config(tp=2)
    wrong_vocab.vocab_size = 999
    expect_error("vocab", lambda: wrap_forward_step(forward_step, wrong_vocab))

    # A teacher serving another k / temperature than the KD block asks for.
    tcfg = load_teacher_config(TEACHER_YAML, ["model.tensor_model_parallel_size=2", "engine.k=8"])
    engine = build_engine(tcfg)
    expect_error("k", lambda: wrap_forward_step(forward_step, kd, source=InProcessSource(engine)))
    batches = micro_batches(1, seed=3)
    directory = _dump(engine, batches, tmp)
    offline = KDConfig(source="offline", k=K, vocab_size=VOCAB, offline=OfflineTeacherConfig(dir=directory))
    expect_error("offline_k", lambda: wrap_forward_step(forward_step, offline))
    offline_t = KDConfig(source="offline", k=8, temperature=2.0, offline=OfflineTeacherConfig(dir=directory))
    expect_error("offline_t", lambda: wrap_forward_step(forward_step, offline_t))
    expect_error("offline_ok", lambda: wrap_forward_step(forward_step, KDConfig(
        source="offline", k=8, offline=OfflineTeacherConfig(dir=directory))))
    return errors


def test_config_contradicting_the_run_fails_at_start_up(tmp_path):
    errors = run_distributed(_startup_errors, 2, str(tmp_path), tp=2)[0]
    assert "TP=1" in errors["teacher_tp"] and "student runs TP=2" in errors["teacher_tp"]
    assert "no_such_checkpoint" in errors["checkpoint"] and "does not exist" in errors["checkpoint"]
    assert "random weights" in errors["random"]
    assert "vocab_size: this run (kd block and student) expects 999, the in_process teacher has 1000" in errors["vocab"]
    assert "k: this run (kd block and student) expects 16, the in_process teacher has 8" in errors["k"]
    assert "k" in errors["offline_k"] and "16" in errors["offline_k"]
    assert "temperature" in errors["offline_t"]
    assert errors["offline_ok"] is None


# ---- the YAML block ----------------------------------------------------------------------------------------------
def test_kd_block_is_strict_and_checked(tmp_path):
    good = {"source": "offline", "k": 8, "offline": {"dir": str(tmp_path)}}
    assert as_kd_config(good).k == 8
    with pytest.raises(ConfigError, match="kd.alhpa"):
        as_kd_config({**good, "alhpa": 0.5})
    with pytest.raises(ConfigError, match="alpha must be in"):
        as_kd_config({**good, "alpha": 1.5})
    with pytest.raises(ConfigError, match="kd.in_process section is missing"):
        as_kd_config({"source": "in_process", "k": 8})
    with pytest.raises(ConfigError, match="temperature"):
        as_kd_config({**good, "temperature": 0})
    # An optional section's own error: the field and the values it allows (not "matches none of Optional[...]")
    with pytest.raises(ConfigError, match=r"kd.offline.missing: 'skip' is not one of \['error', 'ce_only'\]"):
        as_kd_config({**good, "offline": {"dir": str(tmp_path), "missing": "skip"}})
    path = tmp_path / "student.yaml"
    path.write_text("model: {}\nkd:\n  source: offline\n  k: 4\n  offline: {dir: dump}\n")
    (tmp_path / "dump").mkdir()
    cfg = load_kd_config(path, ["kd.alpha=0.25"])
    assert cfg.alpha == 0.25 and cfg.offline.dir == str(tmp_path / "dump")  # relative to the YAML
    with pytest.raises(ConfigError, match="no top-level `distill:`"):
        load_kd_config(path, section="distill")


def test_example_config_loads_and_a_missing_dump_is_named():
    from kd_teacher.hooks import make_teacher_source

    cfg = load_kd_config(ROOT / "configs" / "kd_example.yaml")
    assert Path(cfg.in_process.config).is_file()
    with pytest.raises(ConfigError, match="not a directory"):
        make_teacher_source(as_kd_config({"source": "offline", "k": 8, "offline": {"dir": "/nonexistent/dump"}}))


# ---- tensor-parallel ranks that do not read the data (tokens_from: tp_src_rank) ---------------------------------
def _tp_src_rank_with_missing_rows(tmp):
    """One training step with an offline dump that lacks some rows (missing: ce_only), the payload either read on
    every TP rank (data_iterator) or read on TP rank 0 and broadcast (tp_src_rank): reports and gradients."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kd_teacher.engine.model import build_gpt_model
    from kd_teacher.hooks import make_teacher_source, wrap_forward_step
    from kd_teacher.hooks.config import OfflineTeacherConfig

    batches = micro_batches(2, seed=21)
    directory = _dump(make_teacher_source(kd_config(tp=2)).engine, batches[:1], tmp)
    others = micro_batches(2, seed=777)
    others[0]["tokens"][0] = batches[0]["tokens"][0]  # micro-batch 0: row 0 in the dump, row 1 not
    others[1]["tokens"][1] = batches[0]["tokens"][1]  # micro-batch 1: row 1 in the dump, row 0 not
    out = {}
    for mode in ("data_iterator", "tp_src_rank"):
        torch.manual_seed(5)
        model, _ = build_gpt_model(student_config(tp=2))
        # Separate CE and KD passes in both modes: tp_src_rank at TP > 1 cannot use the fused CE + KD pass, whose
        # one gradient rounds differently, and the gradients are compared bitwise.
        kd = KDConfig(source="offline", k=K, alpha=0.6, vocab_size=VOCAB, tokens_from=mode, fused_ce=False,
                      offline=OfflineTeacherConfig(dir=directory, missing="ce_only")).check()
        step = wrap_forward_step(forward_step, kd, model=model)
        reports = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([dict(b) for b in others]), model=[model], num_microbatches=2,
            seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
        )
        step.close()
        out[mode] = {"reports": [{k: v.tolist() for k, v in r.items()} for r in reports],
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    return out


def test_tp_ranks_that_do_not_read_the_data_distil_exactly_the_rows_the_source_rank_does(tmp_path):
    ranks = run_distributed(_tp_src_rank_with_missing_rows, 2, str(tmp_path), tp=2)
    for r in ranks:
        assert all(0 < m["kd teacher coverage"][0] < m["kd teacher coverage"][1] for m in r["tp_src_rank"]["reports"])
        assert r["tp_src_rank"]["reports"] == r["data_iterator"]["reports"]
        for name, grad in r["data_iterator"]["grads"].items():
            assert torch.equal(r["tp_src_rank"]["grads"][name], grad), name
    assert ranks[0]["tp_src_rank"]["reports"] == ranks[1]["tp_src_rank"]["reports"]  # every TP rank, one loss
