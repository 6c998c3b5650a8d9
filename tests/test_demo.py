"""The embedded tiny teacher and `make demo`: committed assets load and score as recorded; the demo pipeline
(dump -> two students through Megatron's schedule, one via the KD hook -> report) runs end to end."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_teacher import assets
from kd_teacher.testing.distributed import run_distributed

REPO = Path(__file__).resolve().parents[1]


# ---- the committed corpus and tokenizer ------------------------------------------------------------------------
def test_corpus_splits_are_disjoint_stable_and_tokenize():
    docs = assets.read_corpus()
    names = {s: {d.name for d in assets.documents(s, docs)} for s in ("train", "valid", "heldout")}
    assert sum(len(v) for v in names.values()) == len(docs) == len({d.name for d in docs})
    assert names["heldout"] and names["valid"] and not (names["train"] & names["heldout"])
    assert all(assets.split_of(n) == "heldout" for n in names["heldout"])
    tok = assets.load_tokenizer()
    assert tok.get_vocab_size() == 4096
    text = "def read(self, size=-1):\n        return self._buffer[:size]\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level BPE round-trips code exactly
    rows = assets.split_sequences("heldout", 64, tok, docs, max_sequences=5)
    assert rows.shape == (5, 65) and rows.dtype == torch.int64 and int(rows.max()) < 4096


def test_corrupt_corpus_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    assets.write_corpus([assets.Document("a.py", "x = 1\n")], path)
    with gzip.open(path, "at") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl.gz:2"):
        assets.read_corpus(path)
    with pytest.raises(ValueError, match="shorter than one sequence"):
        assets.sequences(torch.arange(10, dtype=torch.int32), 16)


# ---- the committed teacher (run on a gloo rank with Megatron's parallel_state) ------------------------------------
def _score_committed_teacher():
    from kd_teacher.assets.teacher import build_tiny_teacher, load_training_record
    from kd_teacher.engine.engine import EngineConfig, TeacherEngine

    model, cfg, meta = build_tiny_teacher()
    record = load_training_record()
    engine = TeacherEngine(model, cfg.vocab_size, EngineConfig(k=8), model_config=cfg)
    rows = assets.split_sequences("heldout", record["heldout"]["seq_len"], max_sequences=32)
    tokens, labels = rows[:, :-1], rows[:, 1:]
    losses = []
    for i in range(0, rows.shape[0], 8):
        logits = engine.teacher_logits(tokens[i:i + 8])[..., : cfg.vocab_size].float()
        losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                                        labels[i:i + 8].reshape(-1), reduction="none"))
    payload = engine.score(tokens[:2])
    logits = engine.teacher_logits(tokens[:2])[..., : cfg.vocab_size].float()
    return dict(
        loss=float(torch.cat(losses).double().mean()),
        recorded=record["heldout"]["first_32_sequences_loss"],
        tokenizer_matches=meta["tokenizer"] == assets.tokenizer_id(),
        lse_error=float((payload.lse - torch.logsumexp(logits, -1)).abs().max()),
        top1_matches=bool((payload.indices[..., 0] == logits.argmax(-1)).all()),
        params=sum(p.numel() for p in model.parameters()),
    )


def _load_into_wrong_shape():
    from kd_teacher.assets.teacher import TeacherCheckpointError, load_model_config, load_weights
    from kd_teacher.engine.model import build_gpt_model

    cfg = load_model_config(overrides=["ffn_hidden_size=512"])
    model, _ = build_gpt_model(cfg)
    try:
        load_weights(model)
    except TeacherCheckpointError as e:
        return str(e)
    return None


def test_committed_teacher_scores_its_recorded_heldout_loss():
    out = run_distributed(_score_committed_teacher, 1)[0]
    assert out["params"] == 4_000_000 and out["tokenizer_matches"]
    assert out["loss"] == pytest.approx(out["recorded"], rel=2e-4)
    assert out["loss"] < 4.0  # a trained teacher: uniform over 4096 ids would be 8.3
    assert out["lse_error"] < 1e-4 and out["top1_matches"]


def test_teacher_weights_of_another_shape_are_refused_by_name():
    message = run_distributed(_load_into_wrong_shape, 1)[0]
    assert message is not None and "linear_fc1.weight has shape (1408, 256), the model has (1024, 256)" in message


def test_teacher_assets_fit_the_size_budget():
    weights = assets.TINY_TEACHER_DIR / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    assert assets.CORPUS_PATH.stat().st_size <= 3 * 2**20
    assert (assets.CORPUS_PATH.parent / "LICENSE").read_text().count("PYTHON SOFTWARE FOUNDATION LICENSE") >= 1


# ---- the demo, at reduced size, through its real entry point -----------------------------------------------------
SMOKE = ["steps=4", "eval_every=2", "train_sequences=32", "heldout_sequences=8", "seq_len=32",
         "micro_batch_size=8", "sample_tokens=4", "progress=false", "prompts=['def ']"]


def _demo(args, cwd=REPO):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "kd_teacher.demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_demo_pipeline_smoke(tmp_path):
    out = tmp_path / "demo"
    run = _demo([f"out_dir={out}", *SMOKE])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    dump = report["dump"]
    assert dump["samples"] == 32 and dump["tokens"] == 32 * 32 and dump["k"] == 32
    assert (Path(dump["dir"]) / "manifest.json").is_file()

    ce, kd = report["training"]["CE-only"]["curve"], report["training"]["KD"]["curve"]
    assert ce["step"] == kd["step"] == [0, 2, 4]
    assert ce["heldout_loss"][0] == kd["heldout_loss"][0]  # one initialisation for both students
    assert ce["heldout_loss"][-1] != kd["heldout_loss"][-1]  # ...and KD changed the training
    assert all(v is None for v in ce["train_kd"])
    assert all(math.isfinite(v) and v > 0 for v in kd["train_kd"])  # the hook added the KD term each step

    held = report["heldout"]
    assert held["tokens"] == 8 * 32
    for name in ("KD", "CE-only"):
        assert held[name]["kl_from_teacher"] > 0 and 0 <= held[name]["top1_agreement"] <= 1
        assert held[name]["perplexity"] == pytest.approx(math.exp(held[name]["loss"]))
    wins = held["KD"]["kl_from_teacher"] < held["CE-only"]["kl_from_teacher"] and \
        held["KD"]["loss"] < held["CE-only"]["loss"]
    assert report["kd_wins"] == wins
    assert Path(report["curves_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["samples"]["def "]) == {"teacher", "CE-only", "KD"}
    assert all(s.startswith("def ") for s in report["samples"]["def "].values())
    assert "held-out" in run.stdout and "beat the CE-only student" in run.stdout.replace("beats", "beat")


def test_demo_refuses_bad_config_and_foreign_output_dir(tmp_path):
    run = _demo(["stepz=4"])
    assert run.returncode == 2 and "stepz" in run.stderr
    foreign = tmp_path / "mine"
    (foreign / "dump").mkdir(parents=True)
    (foreign / "dump" / "notes.txt").write_text("keep me")
    run = _demo([f"out_dir={foreign}", *SMOKE])
    assert run.returncode == 2 and "is not a teacher dump" in run.stderr
    assert (foreign / "dump" / "notes.txt").read_text() == "keep me"
