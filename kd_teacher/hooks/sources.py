"""Teacher sources: where the hook gets a `TopKPayload` for a micro-batch. Switching is a config change.

`TeacherSource` is the interface the hook relies on (a `typing.Protocol`: a source of the user's own needs no
base class): `score(tokens, *, sample_ids=None, request_id=None) -> TopKPayload`, `score_many`, and
`submit(...) -> handle` / `result(handle)` for payloads requested ahead of use (a source without real
asynchrony computes on `submit`). `info` (a `TeacherContract`) says what the source serves (k, temperature,
vocabulary, fingerprints) so that the hook can refuse a mismatching teacher at start-up rather than at the
first loss.

- `InProcessSource`: a `TeacherEngine` on the student's ranks (same TP and PP, via Megatron's parallel_state).
- `OfflineSource`: `kd_teacher.offline.OfflineTeacher` over a dump directory (content-addressed by token hash).
- `RemoteSource`: the streaming client of `kd_teacher.transport` (teacher on other ranks or processes).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch

from kd_teacher.config import ConfigError
from kd_teacher.contract import TeacherContract
from kd_teacher.hooks.config import KDConfig
from kd_teacher.payload import TopKPayload
from kd_teacher.precision import version_differences

log = logging.getLogger(__name__)


class HostTokens:
    """A host copy of a micro-batch's token ids, started without making the host wait for the GPU.

    Token hashes need the ids on the host. `tokens.cpu()` on a device tensor waits until the GPU has run all
    the work queued before it -- the whole current micro-batch, when the hook reads ahead -- and the GPU then
    idles while the host catches up (~20 such waits per micro-batch cost ~15% of a GPU student's step). Here
    the copy goes into page-locked memory behind an event, and only a reader that needs the ids waits, for
    that copy alone.
    """

    def __init__(self, tokens: torch.Tensor):
        self._ready = None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=torch.int64, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tokens.detach()

    @classmethod
    def of(cls, tokens) -> "HostTokens":
        """`tokens` itself if it already is one, else a copy started now."""
        return tokens if isinstance(tokens, cls) else cls(tokens)

    def get(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host


class TeacherSource(Protocol):
    """What the hook needs of a teacher source. Our sources subclass it for its defaults (`submit` computes
    at once, `result` returns what `submit` gave, `score_many` scores one by one, all flags False)."""

    info: TeacherContract
    # True when scoring is a collective over the pipeline stages (an in-process teacher with PP > 1): then
    # payloads cannot be computed inside a pipeline schedule, where stages run different micro-batches, and
    # must be prepared for the whole step before it (`KDForwardStep.prefetch`).
    pipeline_collective: bool = False
    # True when scoring is a collective over the tensor-parallel group (every TP rank must call it).
    tp_collective: bool = False
    # True when `submit` returns before the payload exists, so reading ahead hides the teacher's latency.
    asynchronous: bool = False
    # True when `submit` takes a `HostTokens` (the hook's host copy of the ids) instead of the ids themselves.
    takes_host_tokens: bool = False

    def score(self, tokens: torch.Tensor, *, sample_ids: Optional[Sequence[int]] = None,
              request_id: Optional[str] = None) -> TopKPayload:
        ...

    def score_many(self, tokens_list: list[torch.Tensor]) -> list[TopKPayload]:
        """Several micro-batches' payloads, in order."""
        return [self.result(self.submit(t)) for t in tokens_list]

    def submit(self, tokens: torch.Tensor, sample_ids: Optional[Sequence[int]] = None,
               request_id: Optional[str] = None) -> Any:
        return self.score(tokens, sample_ids=sample_ids, request_id=request_id)

    def result(self, handle: Any) -> TopKPayload:
        return handle

    def cancel(self, handle: Any) -> None:
        """Give up on a submitted request whose result will never be asked for (nothing to do here)."""

    def close(self) -> None:
        return None


class InProcessSource(TeacherSource):
    """A `TeacherEngine` built on this rank, in the student's TP/PP layout."""

    # Its forward is tensor-parallel: every TP rank of the student takes part in scoring each micro-batch.
    tp_collective = True

    def __init__(self, engine):
        from megatron.core import parallel_state

        self.engine = engine
        self.info = engine.contract
        self.pipeline_collective = parallel_state.get_pipeline_model_parallel_world_size() > 1

    def score(self, tokens, *, sample_ids=None, request_id=None) -> TopKPayload:
        # The hook's KD loss checks the payload's values (lse finite among them) on the device, read without a
        # wait (kd_teacher.hooks.fused.DeferredChecks): the engine's own read would wait for the teacher forward.
        return self.engine.score(tokens, sample_ids=sample_ids, request_id=request_id, check_finite=False)

    def score_many(self, tokens_list: list[torch.Tensor]) -> list[TopKPayload]:
        """Several micro-batches in as few teacher forwards as the engine's scheduler allows."""
        from kd_teacher.engine.scheduler import ScoreRequest

        return self.engine.score_many([ScoreRequest(t) for t in tokens_list])


class _OnBackgroundThread(TeacherSource):
    """A source whose work runs on one background thread, in call order; `backend` is its reader or client."""

    asynchronous = True
    takes_host_tokens = True
    thread_name = "kd-source"

    def __init__(self, backend, info: TeacherContract):
        self.backend = backend
        self.info = info
        self._pool: Optional[ThreadPoolExecutor] = None

    def _run(self, fn, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.backend.close()


class OfflineSource(_OnBackgroundThread):
    """Payloads looked up in a `kd-teacher dump` directory by the token hash of each sequence.

    A lookup is host work (hash the tokens, read and unpack the rows, verify their checksums): on the critical
    path it added ~20% to a GPU student step. `submit` therefore runs it on one background thread (hashlib and
    numpy release the GIL), so the hook's read-ahead hides it behind the student's forward and backward. One
    thread keeps the reader single-threaded and the payloads in order. The thread never touches the GPU: it
    reads the ids from a `HostTokens` copy and leaves the payload in page-locked memory, so that the copy to
    the device is queued without a wait (a device copy from this thread would queue behind, and wait for, the
    student's work).
    """

    thread_name = "kd-offline"

    def __init__(self, reader):
        super().__init__(reader, reader.manifest.contract())

    @property
    def reader(self):
        return self.backend

    def score(self, tokens, *, sample_ids=None, request_id=None) -> TopKPayload:
        return self.reader.score(tokens, sample_ids=sample_ids, request_id=request_id)

    def submit(self, tokens, sample_ids=None, request_id=None) -> Future:
        host = HostTokens.of(tokens)
        return self._run(lambda: self.score(host.get(), sample_ids=sample_ids, request_id=request_id).pin_memory())

    def result(self, handle: Future) -> TopKPayload:
        return handle.result()

    def cancel(self, handle: Future) -> None:
        handle.cancel()  # a lookup already running finishes on its thread and is dropped


class RemoteSource(_OnBackgroundThread):
    """The streaming transport's client; requests go out on `submit` and are awaited on `result`.

    Every call into the client runs on one background thread, in the hook's order (so the client stays
    single-threaded). Submitting needs the ids on the host: the thread reads them from the hook's
    `HostTokens` copy, so the training thread never waits for a device-to-host copy queued behind its own
    forward and backward; it waits only when it needs a payload that has not arrived.
    """

    thread_name = "kd-remote"

    def __init__(self, client):
        super().__init__(client, client.info.contract())

    @property
    def client(self):
        return self.backend

    def score(self, tokens, *, sample_ids=None, request_id=None) -> TopKPayload:
        return self.result(self.submit(tokens, sample_ids, request_id))

    def submit(self, tokens, sample_ids=None, request_id=None) -> Future:
        host = HostTokens.of(tokens)
        return self._run(lambda: self.client.submit(host.get(), sample_ids, request_id))

    def result(self, handle: Future) -> TopKPayload:
        # The submit's own error (a refused request), if any, surfaces here, in the training thread.
        return self._run(lambda: self.client.result(handle.result())).result()

    def cancel(self, handle: Future) -> None:
        # In call order on the client's thread, after the submit: the request stops counting as in flight.
        self._run(lambda: self.client.cancel(handle.result()))


# ---- construction from the KD config ------------------------------------------------------------------------
def make_teacher_source(cfg: KDConfig) -> TeacherSource:
    """Build the source the `kd:` block names; configuration errors surface here, at start-up."""
    cfg.check()
    builders = {"in_process": _in_process, "offline": _offline, "remote": _remote}
    source = builders[cfg.source](cfg)
    log.info("KD teacher source: %s (k=%s, T=%s, vocab=%s)", cfg.source, source.info.k,
             source.info.temperature, source.info.vocab_size)
    return source


def _in_process(cfg: KDConfig) -> InProcessSource:
    from megatron.core import parallel_state

    from kd_teacher.engine.loading import build_engine, load_teacher_config

    icfg = cfg.in_process
    if not Path(icfg.config).is_file():
        raise ConfigError(f"kd.in_process.config: teacher config {icfg.config} does not exist")
    tcfg = load_teacher_config(icfg.config, icfg.overrides)
    if icfg.checkpoint is not None:  # replaces the teacher YAML's weights, of either kind
        tcfg.checkpoint, tcfg.hf_checkpoint = icfg.checkpoint, None
    if tcfg.checkpoint is not None:
        from kd_teacher.engine.checkpoint import resolve_checkpoint_dir

        try:
            resolve_checkpoint_dir(tcfg.checkpoint, tcfg.checkpoint_iteration)
        except FileNotFoundError as e:
            raise ConfigError(f"kd.in_process.checkpoint: {e}") from None
    if not tcfg.has_weights and not icfg.allow_random_weights:
        raise ConfigError(
            f"kd.in_process: the teacher config {icfg.config} names no checkpoint, so the teacher would have "
            "random weights; set kd.in_process.checkpoint, or kd.in_process.allow_random_weights: true for tests"
        )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    m = tcfg.model
    if m.tensor_model_parallel_size != tp:
        raise ConfigError(
            f"in-process teacher has TP={m.tensor_model_parallel_size} but the student runs TP={tp}: an "
            "in-process teacher shares the student's ranks and tensor-parallel groups, so its TP must equal "
            "the student's (use an offline or remote teacher for another layout)"
        )
    if m.pipeline_model_parallel_size != pp:
        raise ConfigError(
            f"in-process teacher has PP={m.pipeline_model_parallel_size} but the student runs PP={pp}: it "
            "must use the student's pipeline layout"
        )
    # The KD block is authoritative for what the loss consumes: serve exactly its k and temperature.
    tcfg.engine.k, tcfg.engine.temperature, tcfg.engine.extraction = cfg.k, cfg.temperature, cfg.extraction
    return InProcessSource(build_engine(tcfg))


def _offline(cfg: KDConfig) -> OfflineSource:
    try:
        from kd_teacher.offline.reader import OfflineTeacher
    except ImportError as e:
        raise ConfigError(f"kd.source: offline needs kd_teacher.offline.reader, which failed to import: {e}") from e
    ocfg = cfg.offline
    if not Path(ocfg.dir).is_dir():
        raise ConfigError(f"kd.offline.dir: {ocfg.dir} is not a directory (no teacher dump there)")
    expect = {"k": cfg.k, "temperature": cfg.temperature, "extraction": cfg.extraction}
    if cfg.vocab_size is not None:
        expect["vocab_size"] = cfg.vocab_size
    # Rows the dump lacks are always served as placeholders marked absent (`payload.present`): the hook decides
    # what they mean (an error in training under missing: error, cross-entropy only otherwise and in evaluation).
    reader = OfflineTeacher(ocfg.dir, expect=expect, missing="ce_only")
    versions = version_differences(reader.manifest.recipe)
    if versions:
        log.warning("the offline dump %s was made with %s: its precision recipe is this run's, but other library "
                    "versions can compute other numbers", ocfg.dir, ", ".join(versions))
    return OfflineSource(reader)


def _remote(cfg: KDConfig) -> RemoteSource:
    try:
        from kd_teacher.transport import make_client
    except ImportError as e:
        raise ConfigError(f"kd.source: remote needs kd_teacher.transport, which failed to import: {e}") from e
    return RemoteSource(make_client(cfg.remote, k=cfg.k, temperature=cfg.temperature, vocab_size=cfg.vocab_size,
                                timeout_s=cfg.timeout_s))
