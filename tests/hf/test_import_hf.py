"""`kd-teacher import-hf`: the converted teacher (dist checkpoint + teacher YAML, loaded at another layout) and
the linked one give bit for bit the payloads of the direct load; the tokenizer identity travels in payload
headers and the dump manifest, and the training hook refuses a student with another tokenizer, naming both;
bad checkpoints are refused with an error naming the problem."""

import json
import logging
import shutil

import pytest
import torch

from kd_teacher.cli import main
from kd_teacher.testing.distributed import run_distributed
from kd_teacher.tokenizer_identity import identity_digest, tokenizer_identity
from tests.hf.hf_fixtures import (
    VOCAB, dump_and_hook, import_hf, imported_equals_direct, make_checkpoint, tokens, write_tokenizer,
)


def _same_payloads(out):
    for a, b in zip(out["imported"], out["direct"]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    imported, direct = out["headers"]
    assert imported.teacher_fingerprint == direct.teacher_fingerprint
    assert imported.recipe_fingerprint == direct.recipe_fingerprint
    assert identity_digest(imported.tokenizer_identity) == identity_digest(direct.tokenizer_identity)


@pytest.mark.parametrize("family,layout,overrides", [
    ("qwen3", [], ["model.tensor_model_parallel_size=2"]),  # converted at TP=1, served at TP=2
    ("mixtral", [], ["model.expert_model_parallel_size=2"]),  # converted at EP=1, served at EP=2
])
def test_imported_checkpoint_gives_the_direct_loads_payloads(tmp_path, family, layout, overrides):
    hf = make_checkpoint(family, tmp_path / family)
    out = tmp_path / "teacher"
    assert run_distributed(import_hf, 2, str(hf), str(out), *layout) == [0, 0]
    assert (out / "checkpoint" / "metadata.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    ep = 2 if family == "mixtral" else 1
    tp = 2 if family == "qwen3" else 1
    for result in run_distributed(imported_equals_direct, 2, str(hf), str(out / "teacher.yaml"), tokens(), overrides,
                                  tp=tp, ep=ep):
        assert result["checkpoint"] == str(out / "checkpoint")
        _same_payloads(result)


def test_linked_teacher_and_tokenizer_identity_through_dump_and_hook(tmp_path):
    hf = make_checkpoint("llama", tmp_path / "llama")
    assert main(["import-hf", str(hf), "--out", str(tmp_path / "linked"), "--link"]) == 0
    teacher_yaml = str(tmp_path / "linked" / "teacher.yaml")
    result = run_distributed(imported_equals_direct, 2, str(hf), teacher_yaml, tokens(),
                             ["model.tensor_model_parallel_size=2"], tp=2)[0]
    assert result["hf_checkpoint"] == str(hf) and result["checkpoint"] is None
    _same_payloads(result)
    teacher_identity = tokenizer_identity(hf)
    assert result["headers"][0].tokenizer_identity == teacher_identity

    # The student's tokenizer: the same files elsewhere (same digest, another name), or another vocabulary.
    shutil.copytree(hf, tmp_path / "student-same")
    write_tokenizer(tmp_path / "student-other", VOCAB, prefix="u")
    students = {"same": str(tmp_path / "student-same"), "other": str(tmp_path / "student-other")}
    out = run_distributed(dump_and_hook, 2, teacher_yaml, tokens(), str(tmp_path / "dump"), students)[0]
    assert out["manifest_tokenizer"] == teacher_identity
    assert out["refusals"]["same"] is None
    refusal = out["refusals"]["other"]
    assert "tokenizer_identity" in refusal
    assert teacher_identity in refusal and tokenizer_identity(students["other"]) in refusal


def _import_error(caplog, path, tmp_path) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["import-hf", str(path), "--out", str(tmp_path / "out"), "--link"]) == 2
    return caplog.text


def test_bad_checkpoints_are_refused_by_name(tmp_path, caplog):
    good = make_checkpoint("qwen2", tmp_path / "good")

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    shutil.copy(good / "config.json", pickles / "config.json")
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    text = _import_error(caplog, pickles, tmp_path)
    assert "pytorch_model.bin" in text and "safetensors only" in text

    sharded = tmp_path / "sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(good).save_pretrained(sharded, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (sharded / lost).unlink()
    text = _import_error(caplog, sharded, tmp_path)
    assert "missing shard" in text and lost in text

    config = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    text = _import_error(caplog, good, tmp_path)
    assert "model.layers.0.mlp.gate_proj.weight is [96, 64]" in text and "config.json implies [128, 64]" in text

    for change, words in [({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
                           ["unknown architecture", "'gpt2'", "GPT2LMHeadModel", "qwen3_moe"]),
                          ({"use_sliding_window": True, "sliding_window": 32}, ["sliding_window=32"]),
                          ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}},
                           ["rope_scaling type 'yarn'", "default, linear, llama3"])]:
        (good / "config.json").write_text(json.dumps({**config, **change}))
        text = _import_error(caplog, good, tmp_path)
        assert all(w in text for w in words), (change, text)
