"""`kd-teacher dump --megatron-args ...`: the student's Megatron-LM data arguments give exactly the samples that
megatron-core's GPTDataset gives for the same settings built the way pretrain_gpt.py builds them, and a dump
made from them covers every sample the student trains and evaluates on (`missing: error` never fires)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_teacher.config import ConfigError
from kd_teacher.megatron_lm.datasets import MegatronLMSource, num_samples, parse_data_args
from kd_teacher.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQ = 1000, 32


def _corpus(prefix: Path, documents: int, seed: int) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(documents):
        doc = np.append(rng.integers(0, VOCAB - 1, int(rng.integers(8, 120))), VOCAB - 1).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return _corpus(root / "a_text_document", 300, 1), _corpus(root / "b_text_document", 200, 2)


def _as_pretrain_gpt_builds_them(blend, blend_per_split, split, sizes, seed, cache):
    """Megatron-core's GPTDataset for these settings, as pretrain_gpt.py's train_valid_test_datasets_provider
    builds them (core_gpt_dataset_config_from_args' fields at their Megatron-LM defaults)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=SEQ, blend=blend, blend_per_split=blend_per_split, split=split,
        path_to_cache=cache, tokenizer=NullTokenizer(VOCAB), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=True, mid_level_dataset_surplus=0.005,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return [[d[i]["tokens"].tolist() for i in range(size)] for d, size in ((train, sizes[0]), (valid, sizes[1]))]


def _rows(source):
    return [source.tokens(i).tolist() for i in range(len(source))]


RUN = ["--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "12", "--eval-interval", "5",
       "--eval-iters", "2", "--seq-length", str(SEQ), "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB)]


def _compare(case, a, b, tmp):
    """(dump source rows, GPTDataset rows) for one case; in a worker with a process group (blends need one)."""
    cache = str(Path(tmp) / "cache")
    if case == "one prefix":
        args = ["--data-path", a, "--split", "90,8,2", "--seed", "7"]
        blend, per_split, split = ([a], None), None, "90,8,2"
    elif case == "weighted blend":
        args = ["--data-path", "0.3", a, "0.7", b, "--split", "80,20,0", "--seed", "3"]
        blend, per_split, split = ([a, b], [0.3, 0.7]), None, "80,20,0"
    else:
        args = ["--train-data-path", a, "--valid-data-path", b, "--test-data-path", b, "--seed", "5"]
        blend, per_split, split = None, [([a], None), ([b], None), ([b], None)], None
    # A pasted command line: arguments that do not shape the data are ignored.
    argv = ["--num-layers", "2", "--lr", "3e-4", "--bf16", *RUN, *args, "--data-cache-path", cache]
    sizes = num_samples(parse_data_args(argv))
    train, valid = _as_pretrain_gpt_builds_them(blend, per_split, split, sizes, int(args[args.index("--seed") + 1]),
                                                str(Path(tmp) / "reference_cache"))
    both = MegatronLMSource(argv, splits=["train", "valid"])
    return dict(sizes=sizes, train=_rows(MegatronLMSource(argv)), both=_rows(both), expected=(train, valid),
                splits=[p["split"] for p in both.identity()["splits"]])


@pytest.mark.parametrize("case", ["one prefix", "weighted blend", "per-split paths"])
def test_samples_equal_megatron_cores_gpt_dataset_for_the_same_arguments(corpora, tmp_path, case):
    out = run_distributed(_compare, 1, case, *corpora, str(tmp_path))[0]
    assert out["sizes"] == [12 * 8, (12 // 5 + 1) * 2 * 8, 2 * 8]  # get_train_valid_test_num_samples
    train, valid = out["expected"]
    assert len(train) == 96 and len(valid) == 48
    assert out["train"] == train
    assert out["both"] == train + valid and out["splits"] == ["train", "valid"]


def test_runs_that_are_not_a_fixed_sample_list_or_lack_sizes_are_refused(corpora):
    a, _ = corpora
    base = [*RUN, "--data-path", a, "--split", "90,8,2"]
    with pytest.raises(ConfigError, match="--mock-data"):
        parse_data_args([*base, "--mock-data"])
    with pytest.raises(ConfigError, match="--sft"):
        parse_data_args([*base, "--sft"])
    with pytest.raises(ConfigError, match="--seq-length is missing"):
        parse_data_args(["--data-path", a, "--train-samples", "8"])
    with pytest.raises(ConfigError, match="--global-batch-size is needed"):
        parse_data_args(["--data-path", a, "--seq-length", "8", "--train-iters", "3"])
    no_interval = [x for x in base if x not in ("--eval-interval", "5")]
    with pytest.raises(ConfigError, match="--eval-interval is needed"):
        MegatronLMSource(no_interval, splits=["valid"])
    with pytest.raises(ConfigError, match="give the dataset's tokenizer as data.tokenizer"):
        MegatronLMSource([*base, "--tokenizer-type", "HuggingFaceTokenizer"])


def _read_back(argv, dump_dir):
    """Every global batch of the student's train and validation samples, looked up with missing: error."""
    from kd_teacher.offline.reader import OfflineTeacher

    source = MegatronLMSource(argv, splits=["train", "valid"])
    teacher = OfflineTeacher(dump_dir, missing="error")
    for start in range(0, len(source), 8):
        teacher.score(torch.stack([source.tokens(i) for i in range(start, start + 8)]))  # MissingSamplesError if any
    return {"missing": teacher.missing_sequences, "served": teacher.served_sequences}


def test_a_dump_from_the_students_arguments_covers_every_training_and_validation_sample(corpora, tmp_path):
    import yaml

    a, _ = corpora
    argv = [*RUN, "--data-path", a, "--split", "90,8,2", "--seed", "11", "--data-cache-path", str(tmp_path / "c")]
    config = tmp_path / "dump.yaml"
    config.write_text(yaml.safe_dump({
        "teacher_config": str(ROOT / "configs" / "kd_teacher_tiny.yaml"), "allow_random_weights": True,
        "data": {"kind": "megatron_lm", "splits": ["train", "valid"]},
        "output": {"dir": str(tmp_path / "dump"), "samples_per_shard": 64, "progress": False},
    }))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "kd_teacher.cli", "dump", str(config), "--megatron-args", *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["samples"] == (12 + 3 * 2) * 8

    served = run_distributed(_read_back, 1, argv, str(tmp_path / "dump"))[0]
    assert served == {"missing": 0, "served": (12 + 3 * 2) * 8}
    manifest = json.loads((tmp_path / "dump" / "manifest.json").read_text())
    assert manifest["dataset"]["megatron_args"] == argv
