"""Test support for the offline-dump tests: tiny Megatron indexed datasets, dump configs, teachers.

Module-level functions so that `run_distributed` workers (spawned processes) can import them by name.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kd_teacher.engine.engine import EngineConfig
from kd_teacher.engine.loading import TeacherConfig
from kd_teacher.engine.model import ModelConfig
from kd_teacher.offline import format as fmt
from kd_teacher.offline.data import DataConfig, TokenizerConfig
from kd_teacher.offline.writer import DumpConfig, OutputConfig

SEQ = 32


def write_indexed_dataset(prefix: Path, vocab: int, docs: int = 40, seed: int = 0) -> str:
    """A .bin/.idx pair written by Megatron-Core's own IndexedDatasetBuilder: `docs` documents of random
    length, each ending with the EOD id (vocab - 1)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    g = torch.Generator().manual_seed(seed)
    dtype = np.uint16 if vocab <= 65536 else np.int32
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for _ in range(docs):
        n = int(torch.randint(5, 60, (1,), generator=g))
        doc = torch.cat([torch.randint(0, vocab - 1, (n,), generator=g), torch.tensor([vocab - 1])])
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def tiny_teacher(vocab: int = 1000, hidden: int = 64, k: int = 8, max_tokens: int = 128, dtype: str = "float32",
                 tp: int = 1) -> TeacherConfig:
    model = ModelConfig(num_layers=2, hidden_size=hidden, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=2 * hidden, vocab_size=vocab, max_sequence_length=128,
                        make_vocab_size_divisible_by=8, tensor_model_parallel_size=tp)
    model.precision.params_dtype = dtype
    return TeacherConfig(model=model, engine=EngineConfig(k=k, temperature=1.0, max_tokens_per_batch=max_tokens))


def gpt_dump_config(out: Path, prefix: str, vocab: int = 1000, samples_per_shard: int = 5, seq: int = SEQ,
                    **teacher_kw) -> DumpConfig:
    data = DataConfig(kind="gpt", blend=[prefix], split="90,10,0", seq_length=seq, seed=7,
                      tokenizer=TokenizerConfig(vocab_size=vocab, eod=vocab - 1, name="test-tokenizer"))
    return DumpConfig(teacher=tiny_teacher(vocab, **teacher_kw), data=data, allow_random_weights=True,
                      output=OutputConfig(dir=str(out), samples_per_shard=samples_per_shard, progress=False))


def cfg_to(cfg: DumpConfig, out: Path) -> DumpConfig:
    return replace(cfg, output=replace(cfg.output, dir=str(out)))


def dump_on_ranks(cfg: DumpConfig) -> dict:
    """run_distributed target: every rank dumps its shards; returns what the manifest says."""
    from kd_teacher.offline.writer import run_dump

    m = run_dump(cfg)
    return {"shards": m.num_shards, "samples": m.num_samples, "complete": m.complete}


def build_dataset(cfg: DumpConfig):
    from kd_teacher.offline.data import build_source

    return build_source(cfg.data)


def file_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of a dump that is hashed content: manifest, shards and shard entries."""
    directory = Path(directory)
    files = [directory / "manifest.json", *sorted((directory / "shards").iterdir())]
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def student_reads_match_engine(dump_dir: str, cfg: DumpConfig, seed: int) -> dict:
    """run_distributed target on W ranks: for student DP = 1..W (ranks < DP take part), two micro-batch sizes
    and a shuffled data order, every payload the dump serves equals `TeacherEngine.score` of that micro-batch.
    Returns {(dp, mbs): samples this rank checked}."""
    import torch.distributed as dist

    from kd_teacher.engine.loading import build_engine
    from kd_teacher.offline.reader import OfflineTeacher

    engine = build_engine(cfg.teacher)
    source = build_dataset(cfg)
    teacher = OfflineTeacher(dump_dir, expect=dict(k=cfg.teacher.engine.k, temperature=1.0,
                                                   teacher_fingerprint=engine.fingerprint,
                                                   recipe_fingerprint=engine.recipe_fingerprint))
    rank, world = dist.get_rank(), dist.get_world_size()
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
    checked = {}
    for dp in range(1, world + 1):
        if rank >= dp:
            continue
        mine = order[rank::dp]
        for mbs in (2, 3):
            for lo in range(0, len(mine), mbs):
                ids = mine[lo : lo + mbs]
                tokens = torch.stack([source.tokens(i) for i in ids])
                got = teacher.score(tokens, sample_ids=ids, request_id="r")
                want = engine.score(tokens, sample_ids=ids, request_id="r")
                assert torch.equal(got.values, want.values), (dp, mbs, ids)
                assert torch.equal(got.indices, want.indices), (dp, mbs, ids)
                assert torch.equal(got.lse, want.lse), (dp, mbs, ids)
                assert got.header == want.header, (got.header, want.header)
            checked[f"{dp}x{mbs}"] = len(mine)
    return checked


def verify_with_rescore(dump_dir: str, cfg: DumpConfig, n: int) -> dict:
    from dataclasses import asdict

    from kd_teacher.offline.verify import verify

    return asdict(verify(dump_dir, rescore=n, config=cfg))


def score_jsonl_and_compare(cfg: DumpConfig) -> dict:
    """Dump a JSONL source with the given teacher on this rank, read it back, compare with the engine."""
    from kd_teacher.engine.loading import build_engine
    from kd_teacher.offline.data import build_source
    from kd_teacher.offline.reader import OfflineTeacher
    from kd_teacher.offline.writer import run_dump

    engine = build_engine(cfg.teacher)
    source = build_source(cfg.data)
    manifest = run_dump(cfg, engine, source)
    teacher = OfflineTeacher(cfg.output.dir)
    equal = 0
    for i in range(len(source)):
        tokens = source.tokens(i)[None]
        got, want = teacher.score(tokens), engine.score(tokens)
        equal += int(torch.equal(got.values, want.values) and torch.equal(got.indices, want.indices)
                     and torch.equal(got.lse, want.lse))
    top = max(int(source.tokens(i).max()) for i in range(len(source)))
    return dict(samples=len(source), equal=equal, index_bits=manifest.index_bits, max_token=top,
                max_index=max(int(teacher.score(source.tokens(i)[None]).indices.max()) for i in range(len(source))))


def stored_values_follow_values_dtype(cfg: DumpConfig) -> dict:
    """Dump with cfg.output.values_dtype; stored values must equal the engine's logits cast to that dtype."""
    from kd_teacher.engine.loading import build_engine
    from kd_teacher.offline.data import build_source
    from kd_teacher.offline.reader import OfflineTeacher
    from kd_teacher.offline.writer import run_dump
    from kd_teacher.payload import DTYPES

    engine = build_engine(cfg.teacher)
    source = build_source(cfg.data)
    run_dump(cfg, engine, source)
    teacher = OfflineTeacher(cfg.output.dir)
    tokens = torch.stack([source.tokens(i) for i in range(len(source))])
    got, want = teacher.score(tokens), engine.score(tokens)
    dtype = DTYPES[cfg.output.values_dtype]
    return dict(dtype=str(got.values.dtype), header=got.header.values_dtype,
                equal=torch.equal(got.values, want.values.to(dtype)) and torch.equal(got.lse, want.lse)
                and torch.equal(got.indices, want.indices))


def dump_with_tensor_parallel_teacher(cfg: DumpConfig) -> dict:
    """run_distributed target with tp=2: both TP ranks score, rank 0 of the group writes; the dump serves what
    the TP=2 engine scores."""
    from kd_teacher.engine.loading import build_engine
    from kd_teacher.offline.data import build_source
    from kd_teacher.offline.reader import OfflineTeacher
    from kd_teacher.offline.verify import verify
    from kd_teacher.offline.writer import run_dump

    engine = build_engine(cfg.teacher)
    source = build_source(cfg.data)
    manifest = run_dump(cfg, engine, source)
    teacher = OfflineTeacher(cfg.output.dir)
    tokens = torch.stack([source.tokens(i) for i in range(0, len(source), 3)])
    got, want = teacher.score(tokens), engine.score(tokens)
    return dict(complete=manifest.complete, verified=verify(cfg.output.dir).ok,
                equal=torch.equal(got.values, want.values) and torch.equal(got.indices, want.indices)
                and torch.equal(got.lse, want.lse))


# ---- one-rank dumps in forked children (killed, limited, failing) ---------------------------------------------
def _dump_in_child(cfg, fsize_limit=None, before=None):
    """Child process target (fork): one-rank dump; exit code 0 ok, 3 DiskFullError, 4 other error.
    `before`: called first in the child (a fault to inject)."""
    import torch.distributed as dist

    from kd_teacher.offline.writer import run_dump
    from kd_teacher.runtime import init_distributed

    if fsize_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, resource.RLIM_INFINITY))
    code = 0
    try:
        if before is not None:
            before()
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.pop("WORLD_SIZE", None)
        init_distributed()
        run_dump(cfg)
    except fmt.DiskFullError as e:
        print(f"DiskFullError: {e}", file=sys.stderr)
        code = 3
    except BaseException as e:  # noqa: BLE001
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        code = 4
    os._exit(code)


def fork_dump(cfg, **kw):
    p = multiprocessing.get_context("fork").Process(target=_dump_in_child, args=(cfg,), kwargs=kw)
    p.start()
    return p


def _cli_in_child(argv: list[str]) -> None:
    from kd_teacher.cli import main

    try:
        code = main(argv)
    except BaseException as e:  # noqa: BLE001
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        code = 4
    os._exit(code)


def fork_cli(argv: list[str]):
    """`kd-teacher ARGV` in a forked child (its torch.distributed world is its own); exitcode after join()."""
    p = multiprocessing.get_context("fork").Process(target=_cli_in_child, args=(argv,))
    p.start()
    return p


def copy_dump(reference, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(reference[1], out)
    return out


def flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))
