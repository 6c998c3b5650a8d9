"""The dump loop: teacher over a data source, shards written atomically, resumable, several DP ranks at once.

Data flow, one shard at a time:
  plan      - shard i holds samples [i*S, (i+1)*S) and belongs to DP rank i % dp: a pure function of the
              sample count, so a resumed run or a run with another DP size makes the very same shards
  chunk     - consecutive samples of one length, up to the engine's `max_tokens_per_batch`, form one
              micro-batch (the same micro-batches whatever the rank count, so the same teacher numbers)
  score     - `TeacherEngine.score_many` (all ranks of a model-parallel group take part)
  pack      - values cast to the stored dtype, ids packed to `index_bits` on the teacher's device, to host
  write     - in a background thread (the next shard's forwards overlap it): safetensors bytes, temp file,
              fsync, rename; then the shard's manifest entry the same way
  finish    - rank 0 assembles manifest.json from the entries (atomic), marks it complete

Resume: a shard file exists only if it was completely written (rename is atomic), so a rerun skips it and
recomputes the rest. Nothing with a timestamp is hashed: timestamps go to runs.jsonl.
Two dumps in one directory: rank 0 holds an flock on DIR/.dump.lock for the whole run (released by the
kernel if the process dies, so a killed run never leaves a stale lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.distributed as dist

from kd_teacher.config import ConfigError, load_config
from kd_teacher.engine.loading import TeacherConfig
from kd_teacher.engine.scheduler import ScoreRequest
from kd_teacher.offline import format as fmt
from kd_teacher.offline.data import DataConfig, check_token_range
from kd_teacher.offline.packing import bits_for_vocab, pack_ids
from kd_teacher.offline.shard import TABLES, SampleRecord, encode_shard, index_digest
from kd_teacher.dtypes import DTYPE_NAMES, DTYPES, exact_cast
from kd_teacher.payload import EXACT_COUNTS, counts_dtype

log = logging.getLogger(__name__)

_MANIFEST_REFRESH_S = 30.0


@dataclass
class OutputConfig:
    dir: str
    samples_per_shard: int = 256
    # auto: the teacher's logits dtype, stored exactly. A narrower dtype (fp32 logits as bf16) is the user's
    # deliberate, lossy choice: it is recorded and warned about.
    values_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")


@dataclass
class DumpConfig:
    teacher: TeacherConfig
    data: DataConfig
    output: OutputConfig
    # A teacher without `teacher.checkpoint` has random weights: only meant in tests and benchmarks.
    allow_random_weights: bool = False


def load_dump_config(path: str | Path, overrides: list[str] | None = None) -> DumpConfig:
    """Dump YAML; `teacher_config: FILE` is a teacher YAML that `teacher:` is merged over (`config.load_config`)."""
    return load_config(DumpConfig, path, overrides)


def plan_chunks(lengths: list[int], max_tokens: int) -> list[range]:
    """Consecutive runs of equal-length samples, each at most `max_tokens` tokens (one sample at least)."""
    chunks, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] != lengths[start] or (i - start + 1) * lengths[start] > max_tokens:
            chunks.append(range(start, i))
            start = i
    return chunks


# ---- the run ----------------------------------------------------------------------------------------------------
def _mpu():
    from megatron.core import parallel_state

    return parallel_state


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class DumpWriter:
    def __init__(self, cfg: DumpConfig, engine, source):
        self.cfg = cfg
        self.engine = engine
        self.source = source
        self.dir = Path(cfg.output.dir)
        mpu = _mpu()
        self.dp_rank = mpu.get_data_parallel_rank()
        self.dp_size = mpu.get_data_parallel_world_size()
        self.mp_group = mpu.get_model_parallel_group()
        # One rank per model-parallel group writes; its TP/PP peers compute the same payloads with it.
        self.is_writer = mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_pipeline_model_parallel_rank() == 0
        self.is_coordinator = dist.get_rank() == 0
        self.manifest = self._manifest()
        self._lock_fd: Optional[int] = None
        self._finished_before = False  # rank 0: the directory held a finished dump when this run began

    def _manifest(self) -> fmt.Manifest:
        e = self.engine
        logits_dtype = DTYPE_NAMES[e.tconfig.params_dtype]
        values_dtype = logits_dtype if self.cfg.output.values_dtype == "auto" else self.cfg.output.values_dtype
        if e.config.extraction == "sampled":
            values_dtype = self._counts_dtype(values_dtype, logits_dtype)
        elif not exact_cast(logits_dtype, values_dtype):
            log.warning("values are stored as %s from %s logits: a lossy cast (output.values_dtype)",
                        values_dtype, logits_dtype)
        n = len(self.source)
        per = self.cfg.output.samples_per_shard
        stored_config = asdict(self.cfg)
        stored_config["output"].pop("dir")  # where the dump lives is not what it is
        stored_config["output"].pop("progress")
        identity = self.source.identity() if self.is_coordinator else {}
        return fmt.Manifest(
            teacher_fingerprint=e.fingerprint, recipe_fingerprint=e.recipe_fingerprint, k=e.config.k,
            temperature=float(e.config.temperature), vocab_size=e.vocab_size,
            index_bits=bits_for_vocab(e.vocab_size), values_dtype=values_dtype, logits_dtype=logits_dtype,
            num_samples=n, samples_per_shard=per, num_shards=(n + per - 1) // per, recipe=asdict(e.recipe),
            tokenizer=self.source.tokenizer_identity(), tokenizer_identity=e.tokenizer_identity, dataset=identity,
            config=stored_config, extraction=e.config.extraction,
        )

    def _counts_dtype(self, values_dtype: str, logits_dtype: str) -> str:
        """A sampled dump's values are draw counts 0..k: stored exactly (auto: as the engine gives them)."""
        k = self.engine.config.k
        if self.cfg.output.values_dtype == "auto":
            return DTYPE_NAMES[counts_dtype(DTYPES[logits_dtype], k)]
        if k > EXACT_COUNTS[values_dtype]:
            raise ConfigError(f"output.values_dtype {values_dtype} cannot hold a sampled dump's draw counts 0..{k} "
                              f"exactly (it holds integers up to {EXACT_COUNTS[values_dtype]}): use float32 or auto")
        return values_dtype

    def my_shards(self) -> list[int]:
        return list(range(self.dp_rank, self.manifest.num_shards, self.dp_size))

    # ---- top level ------------------------------------------------------------------------------------------
    def run(self) -> fmt.Manifest:
        started = datetime.now(timezone.utc).isoformat()
        self._all_ok(self._prepare if self.is_coordinator else None, "prepare the dump directory")
        written = 0
        error: Optional[BaseException] = None
        try:
            written = self._dump_my_shards()
        except BaseException as e:  # noqa: BLE001 - reported to every rank below, then re-raised here
            error = e
        self._all_ok(error, "dump its shards")
        if self.is_coordinator:
            self._all_ok(self._finish, "write the manifest", started=started, written=written)
        else:
            self._all_ok(None, "write the manifest")
        return fmt.load_manifest(self.dir)

    def _all_ok(self, step, what: str, **kwargs) -> None:
        """Run `step` (on this rank; None: nothing to run, or an exception already raised) and agree with all
        ranks on success, so that no rank waits forever on a peer that failed."""
        error = step if isinstance(step, BaseException) else None
        if callable(step):
            try:
                step(**kwargs)
            except BaseException as e:  # noqa: BLE001
                error = e
        flag = torch.tensor([1 if error is not None else 0], dtype=torch.int64, device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is not None:
            self._release_lock()
            raise error
        if int(flag.item()):
            self._release_lock()
            raise RuntimeError(f"another rank failed to {what} (see its log); rerun the same command to resume")

    # ---- rank 0: directory, lock, manifest --------------------------------------------------------------------
    def _prepare(self) -> None:
        try:
            (self.dir / fmt.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
        except fmt.DumpError:
            raise
        except OSError as e:  # read-only, not ours, not a directory: say where and what, not a traceback
            raise fmt.DumpError(f"cannot write the dump into {self.dir}: {e.strerror or e} ({e.filename}); "
                                "choose a writable output.dir") from e
        removed = fmt.remove_temp_files(self.dir)
        if removed:
            log.info("removed %d temporary files of an interrupted run", removed)
        path = self.dir / fmt.MANIFEST
        old = fmt.load_manifest(self.dir) if path.exists() else None
        if old is not None:
            diff = fmt.identity_diff(old.identity(), self.manifest.identity())
            if diff and not old.shards and not any((self.dir / fmt.SHARDS_DIR).iterdir()):
                # A run that failed before its first shard (bad data, out of memory): nothing of it is lost.
                log.info("replacing the manifest of a dump that has no shard yet (%s)", "; ".join(diff[:4]))
            elif diff:
                raise fmt.DumpMismatchError(
                    f"{self.dir} holds a dump of another configuration ({'; '.join(diff[:4])}); "
                    "use another output.dir or remove this one"
                )
        else:
            stray = [p.name for p in self.dir.iterdir() if p.name not in (fmt.SHARDS_DIR, fmt.LOCK_FILE)]
            if stray or any((self.dir / fmt.SHARDS_DIR).iterdir()):
                raise fmt.NotADumpError(
                    f"{self.dir} is not empty and has no {fmt.MANIFEST}: refusing to write a dump into it"
                )
        # A finished dump stays finished while it is rerun: a rerun killed before it finishes must not leave
        # every training job refusing it (a rerun only adds shards that are missing).
        self._finished_before = old is not None and old.complete
        if not self._finished_before:
            self._write_manifest(self._known_entries())

    def _acquire_lock(self) -> None:
        fd = os.open(self.dir / fmt.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise fmt.DumpLockedError(
                f"{self.dir} is being written by another dump ({holder or 'unknown process'}); wait for it or "
                "use another output.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _known_entries(self) -> dict[int, dict]:
        entries = {}
        for i in range(self.manifest.num_shards):
            p = self.dir / fmt.entry_file(i)
            if p.exists() and (self.dir / fmt.shard_file(i)).exists():
                try:
                    entries[i] = fmt.read_entry(p)
                except fmt.DumpError:  # its writer rank finds it too (`_has_entry`) and scores the shard again
                    continue
        return entries

    def _write_manifest(self, entries: dict[int, dict], complete: bool = False) -> None:
        self.manifest.shards = [entries[i] for i in sorted(entries)]
        self.manifest.complete = complete
        fmt.atomic_write(self.dir / fmt.MANIFEST, self.manifest.to_json())

    def _finish(self, started: str, written: int) -> None:
        entries = self._known_entries()
        missing = [i for i in range(self.manifest.num_shards) if i not in entries]
        if missing:
            raise fmt.DumpError(f"{self.dir}: shards {missing[:8]} are missing after every rank finished")
        self._write_manifest(entries, complete=True)
        record = dict(started=started, finished=datetime.now(timezone.utc).isoformat(),
                      world_size=dist.get_world_size(), data_parallel_size=self.dp_size, shards_written=written,
                      host=os.uname().nodename)
        with open(self.dir / fmt.RUN_LOG, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        m = self.manifest
        log.info("dump complete: %s, %d shards, %d samples, %d tokens, %.1f B/token", self.dir, m.num_shards,
                 m.num_samples, m.total_tokens, m.total_bytes / max(1, m.total_tokens))
        self._release_lock()

    # ---- every rank: its shards ---------------------------------------------------------------------------------
    def _pending(self) -> list[int]:
        """This DP rank's shards not yet on disk, decided by the writer and shared with its TP/PP peers."""
        pending = []
        if self.is_writer:
            for i in self.my_shards():
                if not ((self.dir / fmt.shard_file(i)).exists() and self._has_entry(i)):
                    pending.append(i)
        group_size = dist.get_world_size(self.mp_group)
        if group_size == 1:
            return pending
        src = dist.get_global_rank(self.mp_group, 0)
        buf = torch.full((len(self.my_shards()) + 1,), -1, dtype=torch.int64, device=_device())
        if self.is_writer:
            buf[0] = len(pending)
            buf[1 : 1 + len(pending)] = torch.tensor(pending, dtype=torch.int64)
        dist.broadcast(buf, src=src, group=self.mp_group)
        return buf[1 : 1 + int(buf[0])].tolist()

    def _has_entry(self, i: int) -> bool:
        """Whether shard i (on disk) has a sound entry. A shard renamed into place just before a kill may lack its
        entry: recomputed from the file. A damaged entry: the shard and it are removed, to be scored again."""
        path = self.dir / fmt.entry_file(i)
        if not path.exists():
            self._repair_entry(i)
            return True
        try:
            fmt.read_entry(path)
            return True
        except fmt.DumpError as e:
            log.warning("%s; shard %d will be scored again", e, i)
            (self.dir / fmt.shard_file(i)).unlink()
            path.unlink()
            return False

    def _repair_entry(self, i: int) -> None:
        from safetensors import safe_open

        m = self.manifest
        path = self.dir / fmt.shard_file(i)
        with safe_open(str(path), framework="pt") as f:
            tables = {name: f.get_tensor(name) for name in TABLES}
        r = m.shard_range(i)
        entry = dict(index=i, file=fmt.shard_file(i), first_sample=r.start, samples=len(r),
                     tokens=int(tables["token_offsets"][-1]), index_blake2b=index_digest(tables),
                     bytes=path.stat().st_size, blake2b=fmt.blake2b_file(path))
        fmt.atomic_write(self.dir / fmt.entry_file(i), fmt.sealed_json(entry, fmt.ENTRY_CHECKSUM))

    def _dump_my_shards(self) -> int:
        pending = self._pending()
        mine = self.my_shards()
        total = sum(len(self.manifest.shard_range(i)) for i in mine)
        done = total - sum(len(self.manifest.shard_range(i)) for i in pending)
        bar = self._progress_bar(total, done)
        self._started, self._tokens_scored = time.monotonic(), 0
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-dump-writer")
        inflight: Optional[Future] = None
        last_refresh = time.monotonic()
        try:
            for i in pending:
                t0 = time.monotonic()
                records = self._score_shard(i, bar)
                if inflight is not None:
                    inflight.result()  # at most one shard waits for the disk while the next one is scored
                self._agree_in_group()
                if self.is_writer:
                    inflight = pool.submit(self._write_shard, i, records, t0)
                refresh = self.is_coordinator and not self._finished_before
                if refresh and time.monotonic() - last_refresh > _MANIFEST_REFRESH_S:
                    inflight.result()
                    self._write_manifest(self._known_entries())
                    last_refresh = time.monotonic()
            if inflight is not None:
                inflight.result()
        finally:
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()
        return len(pending)

    def _agree_in_group(self) -> None:
        """Shard boundary: all TP/PP peers are here, so none is left inside a collective if we stop."""
        if dist.get_world_size(self.mp_group) > 1:
            dist.barrier(group=self.mp_group)

    def _progress_bar(self, total: int, done: int):
        if not (self.is_coordinator and self.cfg.output.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=done, unit="sample", dynamic_ncols=True,
                    desc=f"dump rank 0/{self.dp_size}")

    def _score_shard(self, i: int, bar) -> list[SampleRecord]:
        ids = list(self.manifest.shard_range(i))
        tokens = [self.source.tokens(j) for j in ids]
        for j, t in zip(ids, tokens):
            check_token_range(t, self.engine.vocab_size, j)
        records: list[SampleRecord] = []
        for chunk in plan_chunks([len(t) for t in tokens], self.engine.config.max_tokens_per_batch):
            batch = torch.stack([tokens[c] for c in chunk])
            sample_ids = [ids[c] for c in chunk]
            payload = self.engine.score_many([ScoreRequest(batch, sample_ids)])[0]
            if self.is_writer:
                records += self._to_records(payload)
            self._tokens_scored += batch.numel()
            if bar is not None:
                rate = self._tokens_scored / max(time.monotonic() - self._started, 1e-9)
                bar.update(len(chunk))
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        return records

    def _to_records(self, payload) -> list[SampleRecord]:
        h = payload.header
        b, s, k = h.batch, h.seq_len, h.k
        values = payload.values.to(DTYPES[self.manifest.values_dtype]).reshape(b, s, k).cpu()
        packed = pack_ids(payload.indices.reshape(b, s * k), self.manifest.index_bits).cpu()
        lse = payload.lse.cpu()
        return [
            SampleRecord(h.sample_ids[r], bytes.fromhex(h.token_hashes[r]), values[r], packed[r], lse[r])
            for r in range(b)
        ]

    def _write_shard(self, i: int, records: list[SampleRecord], t0: float) -> None:
        data, entry = encode_shard(self.manifest.shard_meta(i), records)
        path = self.dir / fmt.shard_file(i)
        fmt.atomic_write(path, data)
        entry.update(bytes=len(data), blake2b=hashlib.blake2b(data, digest_size=fmt.DIGEST_BYTES).hexdigest())
        fmt.atomic_write(self.dir / fmt.entry_file(i), fmt.sealed_json(entry, fmt.ENTRY_CHECKSUM))
        dt = time.monotonic() - t0
        log.info("shard %d/%d written by DP rank %d: %d samples, %d tokens, %.1f MB, %.2f s (%.0f tok/s)",
                 i + 1, self.manifest.num_shards, self.dp_rank, entry["samples"], entry["tokens"], len(data) / 1e6,
                 dt, entry["tokens"] / max(dt, 1e-9))


def run_dump(cfg: DumpConfig, engine=None, source=None) -> fmt.Manifest:
    """Dump with this process's ranks (torch.distributed and parallel_state initialised by the caller)."""
    from kd_teacher.engine.loading import build_engine
    from kd_teacher.engine.moe_policy import require_independent_replicas
    from kd_teacher.offline.data import build_source

    if engine is None and not cfg.teacher.has_weights and not cfg.allow_random_weights:
        raise ConfigError(
            "teacher.checkpoint is not set, so the dump's teacher would have random weights: set it (a "
            "Megatron-Core distributed checkpoint, or a Megatron-LM --save directory) or teacher.hf_checkpoint, or set "
            "allow_random_weights: true if a random teacher is meant (tests, benchmarks)")
    engine = engine or build_engine(cfg.teacher)
    require_independent_replicas(getattr(engine, "moe", None), "kd-teacher dump")
    source = source or build_source(cfg.data)
    return DumpWriter(cfg, engine, source).run()
