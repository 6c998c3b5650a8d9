"""Inputs of `run_kd_gpu.sh`, made from the project's embedded assets (nothing is downloaded):

    python examples/megatron_lm/prepare.py --work WORK --seq-length 256 --k 64

- data: the embedded corpus's train and valid documents (CPython standard-library sources), tokenized by its
  tokenizer (4096 ids, the tiny teacher's), written as Megatron indexed datasets
  `WORK/data/{train,valid}_text_document.{bin,idx}` with megatron-core's `IndexedDatasetBuilder` (what
  Megatron-LM's tools/preprocess_data.py writes with): one document per corpus file, each ending with the
  tokenizer's end-of-document id. The student reads them with `--tokenizer-type NullTokenizer --vocab-size
  4096`: the ids are already there, and in megatron-core >= 0.18 NullTokenizer(4096) has exactly 4096 ids.
- teacher: the embedded tiny teacher (kd_teacher/assets/tiny_teacher, 4 layers, hidden 256) as a Megatron-Core
  distributed checkpoint with bf16 parameters, `WORK/teacher/ckpt`, and its teacher config
  `WORK/teacher/teacher.yaml` (bf16 because the student trains with --bf16; context `--seq-length`).
- configs: `WORK/dump.yaml` (kd-teacher dump of the student's train and valid splits) and the two KD blocks
  the runs pass with --kd-config: `WORK/kd_offline.yaml` and `WORK/kd_in_process.yaml`.

Run it with the student's megatron-core first on PYTHONPATH (`PYTHONPATH=$MEGATRON_LM:...`): the checkpoint
is written, and later read, by the same megatron-core.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import yaml

log = logging.getLogger("prepare")
VOCAB = 4096


def write_indexed(prefix: Path, docs, tokenizer) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from kd_teacher.assets import EOD_TOKEN

    eod = tokenizer.token_to_id(EOD_TOKEN)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    tokens = 0
    for encoded in tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False):
        ids = np.asarray(encoded.ids + [eod], dtype=np.uint16)
        builder.add_document(torch.from_numpy(ids.astype(np.int64)), [len(ids)])
        tokens += len(ids)
    builder.finalize(f"{prefix}.idx")
    return {"documents": len(docs), "tokens": tokens}


def prepare_data(work: Path) -> dict:
    from kd_teacher.assets import documents, load_tokenizer, read_corpus

    tokenizer = load_tokenizer()
    if tokenizer.get_vocab_size() != VOCAB:
        raise ValueError(f"the embedded tokenizer has {tokenizer.get_vocab_size()} ids, expected {VOCAB}")
    corpus = read_corpus()
    return {split: write_indexed(work / "data" / f"{split}_text_document", documents(split, corpus), tokenizer)
            for split in ("train", "valid")}


def prepare_teacher(work: Path, seq_length: int, k: int) -> Path:
    """The tiny teacher as a bf16 distributed checkpoint plus the teacher config that loads it."""
    from kd_teacher.assets.teacher import build_tiny_teacher, load_model_config
    from kd_teacher.config import to_dict
    from kd_teacher.engine.checkpoint import save_checkpoint
    from kd_teacher.runtime import init_distributed

    init_distributed(1, 1)
    cfg = load_model_config(overrides=["precision.params_dtype=bfloat16", f"max_sequence_length={seq_length}"])
    model, cfg, _ = build_tiny_teacher(cfg=cfg)
    checkpoint = work / "teacher" / "ckpt"
    save_checkpoint(model, checkpoint)
    config = work / "teacher" / "teacher.yaml"
    config.write_text(yaml.safe_dump({
        "model": to_dict(cfg),
        "engine": {"k": k, "temperature": 1.0, "max_tokens_per_batch": 16384},
        "checkpoint": str(checkpoint),
    }, sort_keys=False))
    return config


def write_configs(work: Path, teacher: Path, k: int, alpha: float) -> None:
    (work / "dump.yaml").write_text(yaml.safe_dump({
        "teacher_config": str(teacher),
        # The student's evaluation gets KD metrics too: its valid split is dumped with the train split.
        "data": {"kind": "megatron_lm", "splits": ["train", "valid"]},
        "output": {"dir": str(work / "dump"), "samples_per_shard": 512, "progress": False},
    }, sort_keys=False))
    common = {"k": k, "temperature": 1.0, "kind": "forward_kl", "alpha": alpha}
    (work / "kd_offline.yaml").write_text(yaml.safe_dump({"kd": {
        "source": "offline", **common, "offline": {"dir": str(work / "dump"), "missing": "error"}}}, sort_keys=False))
    (work / "kd_in_process.yaml").write_text(yaml.safe_dump({"kd": {
        "source": "in_process", **common, "in_process": {"config": str(teacher)}}}, sort_keys=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    teacher = prepare_teacher(work, args.seq_length, args.k)
    write_configs(work, teacher, args.k, args.alpha)
    (work / "prepared.json").write_text(json.dumps({"data": data, "teacher": str(teacher)}, indent=1))
    log.info("prepared %s: %s", work, json.dumps(data))


if __name__ == "__main__":
    main()
