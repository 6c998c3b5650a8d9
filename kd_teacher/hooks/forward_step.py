"""`wrap_forward_step`: knowledge distillation added to a Megatron-Core `forward_step`, nothing else changed.

The user's `forward_step(data_iterator, model)` keeps its body. Per micro-batch, on the last pipeline stage
(the only one with a loss), the wrapper:

1. hands the user's function a recording view of `data_iterator`, so it sees the micro-batch the user's code
   draws (tokens and loss mask) without a second read of the data;
2. captures the student's vocab-parallel logits `[s, b, V/TP]` with a forward hook on the model's
   `output_layer`, because a `forward_step` that calls `model(..., labels=labels)` (as Megatron-LM's does)
   returns per-token cross-entropy, not logits;
3. obtains the teacher payload for those tokens from the source (prepared ahead, read ahead, or on demand)
   and checks it against the micro-batch (token hashes) and the KD config (k, temperature, vocabulary,
   precision recipe);
4. returns a loss function that calls the user's one and adds the KD term: `alpha * KD + (1 - alpha) * CE`
   in the user's own loss contract (`(loss_sum, num_tokens, report)` or legacy `(loss, report)`), with KD
   metrics added to the report dict.

Other pipeline stages run the user's `forward_step` untouched.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

from kd_teacher.config import ConfigError
from kd_teacher.contract import TeacherContract
from kd_teacher.tokenizer_identity import tokenizer_identity
from kd_teacher.hooks.combine import combine_losses
from kd_teacher.hooks.config import KDConfig, as_kd_config
from kd_teacher.hooks.fused import DeferredChecks, FusedCrossEntropy, fused_ce_unsupported
from kd_teacher.hooks.sources import HostTokens, TeacherSource, make_teacher_source
from kd_teacher.onpolicy.consistency import add_logprob_gap
from kd_teacher.payload import PayloadError, TopKPayload
from kd_teacher.precision import RECIPE_REMEDY, PrecisionRecipe

log = logging.getLogger(__name__)

BatchFields = Callable[[Any], tuple]  # micro-batch item -> (tokens [b, s], loss_mask [b, s] or None)
# Data iterators read ahead at a time (train, validation, test); the least recently used one stops beyond.
_MAX_READ_AHEAD_STREAMS = 4


def _mpu():
    from megatron.core import parallel_state

    return parallel_state


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ---- 1. seeing the micro-batch ------------------------------------------------------------------------------
class _RecordingIterator:
    """What the user's forward_step iterates: items pass through unchanged and are remembered. With the fused
    CE + KD pass, the first item's payload is obtained and checked as it is drawn: the model needs it."""

    def __init__(self, hook: "KDForwardStep", iterator, fused: Optional[FusedCrossEntropy] = None):
        self.hook = hook
        self.iterator = iterator
        self.fused = fused
        self.drawn: list = []  # [(item, handle or None)]
        self.payload: Optional[TopKPayload] = None  # the first item's, when fetched at the draw

    def __iter__(self):
        return self

    def __next__(self):
        item, handle = self.hook._next_item(self.iterator)
        self.drawn.append((item, handle))
        if self.fused is not None and len(self.drawn) == 1:
            self.payload = self.fused.payload = self.hook._payload(self.hook.batch_fields(item)[0], handle)
        return item


def default_batch_fields(tokens_key: str, loss_mask_key: str) -> BatchFields:
    """Megatron's convention: a dict with `tokens` [b, s] and (optionally) `loss_mask` [b, s]."""

    def fields(item):
        if not isinstance(item, dict) or tokens_key not in item:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise PayloadError(
                f"KD hook: the micro-batch has no {tokens_key!r} entry (got {keys}); set kd.tokens_key, or pass "
                "batch_fields= to wrap_forward_step for another batch format"
            )
        return item[tokens_key], item.get(loss_mask_key)

    return fields


# ---- 2. capturing the student's logits ---------------------------------------------------------------------
class _LogitsCapture:
    """A forward hook on `output_layer` for the duration of one forward_step call."""

    def __init__(self, model):
        from megatron.core.utils import get_attr_wrapped_model

        layer = get_attr_wrapped_model(model, "output_layer", allow_none=False)
        self.logits: Optional[torch.Tensor] = None
        self.seen: Optional[torch.Tensor] = None  # what the model goes on with: the logits or their copy
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        logits, rest = (output[0], tuple(output[1:])) if isinstance(output, tuple) else (output, None)
        # Multi-token-prediction heads call output_layer before the main head does: the last call wins.
        self.logits = self.seen = logits
        if logits.dtype == torch.float32:
            # Megatron's vocab_parallel_cross_entropy works in place on `logits.float()`, which for fp32
            # logits is the tensor itself: give the model's own loss a copy so the KD term sees the logits.
            self.seen = logits.clone()
            return (self.seen, *rest) if rest is not None else self.seen
        return None

    def remove(self) -> None:
        self._handle.remove()


# ---- the wrapped forward step --------------------------------------------------------------------------------
class KDForwardStep:
    """Callable with the signature of the user's forward_step; see the module docstring."""

    def __init__(
        self,
        forward_step: Callable,
        cfg: KDConfig,
        source: TeacherSource,
        *,
        model=None,
        vocab_size: Optional[int] = None,
        batch_fields: Optional[BatchFields] = None,
        read_ahead: Optional[bool] = None,
    ):
        self.forward_step = forward_step
        self.cfg = cfg
        self.source = source
        self.batch_fields = batch_fields or default_batch_fields(cfg.tokens_key, cfg.loss_mask_key)
        self.vocab_size = vocab_size or cfg.vocab_size or source.info.vocab_size
        # Reading ahead only pays when the source works while the student computes.
        self.read_ahead = (source.asynchronous if read_ahead is None else read_ahead) and cfg.prefetch > 0
        # id(data iterator) -> (that iterator, its read-ahead); holding the iterator keeps its id unique.
        self._streams: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
        self._prepared: collections.deque = collections.deque()  # payloads from prefetch(), in order
        # What this run needs of the teacher (the student's recipe is added once the student model is known).
        self.expected = TeacherContract(k=cfg.k, temperature=cfg.temperature, vocab_size=self.vocab_size,
                                        extraction=cfg.extraction,
                                        tokenizer_identity=tokenizer_identity(cfg.tokenizer) if cfg.tokenizer else None)
        self._student_known = False
        # Rows an offline dump lacks: an error in training under kd.offline.missing: error; in evaluation (the
        # model in eval mode, as Megatron-LM's evaluate() sets it) always cross-entropy only, counted.
        self._missing_is_error = cfg.source == "offline" and cfg.offline is not None and cfg.offline.missing == "error"
        self._training = True
        self._deferred = DeferredChecks()
        self._micro_batches = 0
        self.fused_micro_batches = 0  # micro-batches whose CE and KD came from the one fused pass
        self._fused_reason: Optional[str] = None  # why the fused CE + KD pass does not serve (logged once)
        self._check_layout()
        self._check_source()
        if model is not None:
            self._set_student(model)
        functools.update_wrapper(self, forward_step)

    # ---- start-up checks -----------------------------------------------------------------------------------
    def _check_layout(self) -> None:
        mpu = _mpu()
        if mpu.get_context_parallel_world_size() > 1:
            raise NotImplementedError("the KD hook does not support context parallelism (CP > 1) yet")
        if mpu.get_virtual_pipeline_model_parallel_world_size() is not None:
            raise NotImplementedError("the KD hook does not support the interleaved (virtual) pipeline schedule yet")
        if self.read_ahead and self.source.pipeline_collective:
            raise ValueError("kd: reading ahead is not possible with a source whose scoring spans pipeline stages")

    def _check_source(self) -> None:
        """What the source says it serves, against this run's expectation (recipe: see `_set_student`)."""
        self._check_contract(self.source.info, f"the {self.cfg.source} teacher")
        if self.cfg.on_policy is not None and self.vocab_size is None:
            raise PayloadError(
                "kd.on_policy: the student's true vocabulary size is needed (the teacher must score every id the "
                "student can sample): set kd.vocab_size or pass vocab_size= to wrap_forward_step")

    def _check_contract(self, served: TeacherContract, what: str) -> None:
        accept = ("recipe_fingerprint",) if self.cfg.allow_recipe_mismatch else ()
        served.check(self.expected, served=what, expecting="this run (kd block and student)", error=PayloadError,
                     accept=accept, remedy=RECIPE_REMEDY if self.expected.recipe_fingerprint is not None else "")

    def _set_student(self, model) -> None:
        """The student's precision recipe joins the expectation; the source is checked again against it."""
        from megatron.core.utils import get_attr_wrapped_model

        config = get_attr_wrapped_model(model[0] if isinstance(model, list) else model, "config")
        self.expected.recipe_fingerprint = PrecisionRecipe.from_transformer_config(config).fingerprint()
        self._student_known = True
        self._check_source()

    # ---- the forward step ----------------------------------------------------------------------------------
    def __call__(self, data_iterator, model, *args, **kwargs):
        if not _mpu().is_pipeline_last_stage():
            return self.forward_step(data_iterator, model, *args, **kwargs)
        if not self._student_known:
            self._set_student(model)
        self._training = bool(getattr(model, "training", True))
        # Earlier micro-batches' checks not read yet: no backward ran (evaluation: read them now) or not yet
        # (a pipeline schedule's first forwards: read those that are ready, the backward reads the rest).
        self._deferred.run(wait=not self._training)
        capture = _LogitsCapture(model)
        fused = self._fused_ce(model, capture) if data_iterator is not None else None
        feed = _RecordingIterator(self, data_iterator, fused) if data_iterator is not None else None
        try:
            with fused if fused is not None else contextlib.nullcontext():
                output_tensor, loss_func = self.forward_step(feed, model, *args, **kwargs)
        finally:
            capture.remove()
        if capture.logits is None:
            raise RuntimeError("KD hook: the model's output_layer did not run in forward_step; no logits to distil")
        tokens, loss_mask, payload = self._micro_batch(feed)
        batch = feed.drawn[0][0] if feed is not None and feed.drawn else None
        student = fused.student if fused is not None else None
        self._micro_batches += 1
        self.fused_micro_batches += student is not None
        return output_tensor, functools.partial(self._loss, loss_func, capture.logits, tokens, loss_mask, payload,
                                                batch, student, self._micro_batches)

    def _fused_ce(self, model, capture: _LogitsCapture) -> Optional[FusedCrossEntropy]:
        """The fused CE + KD pass for this call, or None (the reason logged once) where it cannot serve."""
        reason = fused_ce_unsupported(model, self.cfg)
        if reason is None and self.cfg.tokens_from == "tp_src_rank" and \
                _mpu().get_tensor_model_parallel_world_size() > 1:
            reason = "kd.tokens_from: tp_src_rank (the payload reaches the other TP ranks after the forward)"
        if reason is not None:
            if reason != self._fused_reason:
                log.info("KD hook: cross-entropy and KD computed in separate passes: %s", reason)
                self._fused_reason = reason
            return None
        return FusedCrossEntropy(model, self.cfg, self.vocab_size, _mpu().get_tensor_model_parallel_group(),
                                 lambda: capture.seen)

    # ---- 3. the payload of this micro-batch ---------------------------------------------------------------
    def _micro_batch(self, feed: Optional[_RecordingIterator]):
        drawn = feed.drawn if feed is not None else []
        if len(drawn) > 1:
            raise RuntimeError(f"KD hook: forward_step drew {len(drawn)} items from the data iterator; expected 1")
        tp_src_mode = self.cfg.tokens_from == "tp_src_rank" and _mpu().get_tensor_model_parallel_world_size() > 1
        if not tp_src_mode:
            if not drawn:
                raise RuntimeError(
                    "KD hook: forward_step on the last pipeline stage did not read a micro-batch from its data "
                    "iterator, so the teacher cannot see its tokens; if only tensor-parallel rank 0 reads the "
                    "data (as Megatron-LM's get_batch does), set kd.tokens_from: tp_src_rank"
                )
            item, handle = drawn[0]
            tokens, loss_mask = self.batch_fields(item)
            return tokens, loss_mask, feed.payload if feed.payload is not None else self._payload(tokens, handle)
        return self._micro_batch_from_tp_src(drawn)

    def _micro_batch_from_tp_src(self, drawn):
        mpu = _mpu()
        is_src = mpu.get_tensor_model_parallel_rank() == 0
        if is_src and not drawn:
            raise RuntimeError("KD hook: tensor-parallel rank 0 of the last stage did not read a micro-batch")
        tokens, loss_mask, handle = None, None, None
        if is_src:
            (item, handle), = drawn
            tokens, loss_mask = self.batch_fields(item)
        tokens, loss_mask = _broadcast_batch(tokens, loss_mask)
        if self.source.tp_collective:
            # The in-process teacher is itself tensor-parallel: every TP rank takes part in its forward.
            return tokens, loss_mask, self._payload(tokens, handle)
        payload = self._payload(tokens, handle) if is_src else None
        return tokens, loss_mask, _broadcast_payload(payload)

    # The record_function ranges name the hook's host work in a torch.profiler trace (benchmarks/kd_step.py
    # --profile accounts for them); without a profiler they cost a few microseconds per micro-batch.
    def _payload(self, tokens: torch.Tensor, handle) -> TopKPayload:
        host = None
        with record_function("kd_teacher.hook.payload"):
            if self._prepared:
                payload = self._prepared.popleft()
            elif handle is not None:
                source_handle, host = handle
                payload = self.source.result(source_handle)
            elif self.source.pipeline_collective:
                raise RuntimeError(
                    "KD hook: the in-process teacher spans pipeline stages, so its payloads must be computed before "
                    "the pipeline schedule runs: pass data_iterator=kd_step.prefetch(data_iterator, "
                    "num_microbatches) to forward_backward_func (or use an offline or remote teacher)"
                )
            else:
                payload = self.source.score(tokens)
        return self._checked(payload, host.get() if host is not None else tokens)

    def _checked(self, payload: TopKPayload, tokens: torch.Tensor) -> TopKPayload:
        """Everything the loss relies on, before it is used; the payload ends up on the student's device."""
        # Header, shapes and dtypes here; the values (ids in range, finite, lse above every value, distinct ids)
        # by the KD loss on the device, read without a wait before the gradient can be used (DeferredChecks):
        # on a host-bound GPU step, checking half a million values here cost ~2.5 ms of host time per micro-batch.
        with record_function("kd_teacher.hook.validate"):
            payload.validate(values=False)
        with record_function("kd_teacher.hook.token_hash"):
            payload.check_tokens(tokens)
        self._check_coverage(payload)
        self._check_contract(payload.header, "the teacher payload")
        # Offline payloads arrive in page-locked host memory: the copy is queued, the host does not wait.
        with record_function("kd_teacher.hook.payload_to_device"):
            return payload.to(_device(), non_blocking=True)

    def _check_coverage(self, payload: TopKPayload) -> None:
        present = payload.present
        if present is None or not (self._training and self._missing_is_error) or bool(present.all()):
            return
        from kd_teacher.offline.format import MissingSamplesError

        missing, rows = int((~present).sum()), present.numel()
        raise MissingSamplesError(
            f"{missing} of {rows} sequences of this training micro-batch are not in the offline dump "
            f"{self.cfg.offline.dir}: was it dumped from this run's dataset (seq length, split, seed, blend, "
            "samples)? Set kd.offline.missing: ce_only to train such sequences on cross-entropy only (counted "
            "in the `kd teacher coverage` metric); evaluation always does so"
        )

    # ---- reading ahead (sources that work asynchronously) ----------------------------------------------------
    def _next_item(self, iterator):
        if not self.read_ahead:
            return next(iterator), None
        outer, stream = self._stream(iterator)
        item = next(outer)
        return item, stream.claim(item)

    def _stream(self, iterator):
        """(what to draw from, the read-ahead of `iterator`); the few most recently used iterators read ahead."""
        key = id(iterator)
        if key not in self._streams:
            rerun = _rerun_iterator(iterator)
            if rerun is None:
                stream = _ReadAhead(self, iterator)
            elif isinstance(rerun.iterable, _ReadAhead) and rerun.iterable.hook is self:
                stream = rerun.iterable  # installed before, stopped when another iterator evicted it
                stream.active = True
            else:
                stream = rerun.iterable = _ReadAhead(self, rerun.iterable)
            self._streams[key] = (iterator, stream)
            while len(self._streams) > _MAX_READ_AHEAD_STREAMS:
                _, (evicted, old) = self._streams.popitem(last=False)
                old.stop(drop_items=_rerun_iterator(evicted) is None)
        self._streams.move_to_end(key)
        iterator, stream = self._streams[key]
        return (stream if stream.iterator is iterator else iterator), stream

    def _submit(self, item):
        tokens, _ = self.batch_fields(item)
        # One host copy of the ids per micro-batch, started now and read when the payload is checked.
        host = HostTokens(tokens)
        return self.source.submit(host if self.source.takes_host_tokens else tokens), host

    # ---- preparing a whole step (teachers that span pipeline stages) -----------------------------------------
    def prefetch(self, data_iterator, num_microbatches: int):
        """Read the step's micro-batches now and get their payloads ready; returns an iterator over them.

        Needed when the in-process teacher spans pipeline stages (PP > 1): its forward is a collective over
        the stages, which cannot run inside the student's 1F1B schedule where stages are at different
        micro-batches. Every rank calls this at the same point, before `forward_backward_func`.
        """
        if data_iterator is None:
            if self.source.pipeline_collective:
                raise RuntimeError("KD hook: prefetch() with an in-process PP teacher needs the data on every rank")
            return None
        items = [next(data_iterator) for _ in range(num_microbatches)]
        tokens = [self.batch_fields(item)[0] for item in items]
        payloads = self.source.score_many(tokens)
        if _mpu().is_pipeline_last_stage():
            self._prepared.extend(payloads)
        return iter(items)

    # ---- 4. the loss ---------------------------------------------------------------------------------------
    def _loss(self, user_loss_func, logits, tokens, loss_mask, payload, batch, student, number, output_tensor,
              *args, **kwargs):
        if kwargs.get("non_loss_data"):
            return user_loss_func(output_tensor, *args, **kwargs)
        outputs = user_loss_func(output_tensor, *args, **kwargs)
        hashes = payload.header.token_hashes
        what = (f"KD micro-batch {number} of this hook (token hashes {', '.join(h[:12] for h in hashes[:4])}"
                f"{', ...' if len(hashes) > 4 else ''})")
        with record_function("kd_teacher.kd_loss"):
            outputs = combine_losses(outputs, logits, payload, loss_mask, self.cfg, self.vocab_size, student=student,
                                     deferred=self._deferred, what=what)
        if self.cfg.on_policy is not None and self.cfg.on_policy.report_logprob_gap:
            # The student's samples carry their sampling-time log-probs (kd_teacher.onpolicy.OnPolicyIterator).
            outputs = add_logprob_gap(outputs, logits, batch if isinstance(batch, dict) else None,
                                      self.vocab_size, _mpu().get_tensor_model_parallel_group())
        return outputs

    def close(self) -> None:
        try:
            self._deferred.run()
        finally:
            for _, stream in self._streams.values():
                stream.stop(drop_items=False)
            self._streams.clear()
            self.source.close()


class _ReadAhead:
    """Micro-batches drawn from one data iterator ahead of the user's forward_step, each with its payload
    request already in flight (`kd.prefetch` of them beyond the one being consumed).

    Megatron-LM wraps its data iterators in a `RerunDataIterator`, which records a step's micro-batches and
    replays them when it re-runs the step (to tell a transient fault from a reproducible one). Reading ahead
    above it would record the next step's micro-batches in this one and replay the wrong ones, so for such an
    iterator the read-ahead goes underneath (as its `iterable`): it records and replays exactly what
    forward_step drew. A replayed micro-batch is a copy this read-ahead never handed out, so `claim` finds no
    request for it and the hook fetches its payload again; payloads are always checked against the tokens.
    """

    def __init__(self, hook: KDForwardStep, iterator):
        self.hook = hook
        self.iterator = iterator
        self.pending: collections.deque = collections.deque()  # (item, request or None), in data order
        self.handed = None  # the (item, request) handed out last, until the hook claims it
        self.active = True

    def __iter__(self):
        return self

    def __next__(self):
        while self.active and len(self.pending) <= self.hook.cfg.prefetch:
            try:
                item = next(self.iterator)
            except StopIteration:
                break
            self.pending.append((item, self.hook._submit(item)))
        self.handed = self.pending.popleft() if self.pending else (next(self.iterator), None)
        return self.handed[0]

    def claim(self, item):
        """The request made for `item` if it is the micro-batch handed out last (not a replayed copy)."""
        handed, self.handed = self.handed, None
        return handed[1] if handed is not None and handed[0] is item else None

    def stop(self, drop_items: bool) -> None:
        """Stop reading ahead and cancel the requests in flight. Micro-batches already drawn are still handed
        out in order (their payloads then fetched on demand) unless `drop_items`: a plain iterator evicted by
        others is no longer reachable through this read-ahead."""
        self.active = False
        entries = list(self.pending) + ([self.handed] if self.handed is not None else [])
        for _, request in entries:
            if request is not None:
                self.hook.source.cancel(request[0])
        self.pending = collections.deque((item, None) for item, _ in self.pending)
        self.handed = None
        if drop_items and self.pending:
            log.warning("KD hook: %d micro-batches read ahead from a data iterator not used lately are dropped "
                        "(more than %d data iterators in use)", len(self.pending), _MAX_READ_AHEAD_STREAMS)
            self.pending.clear()


def _rerun_iterator(iterator):
    """`iterator` if it is Megatron-Core's RerunDataIterator (replays a step's micro-batches), else None."""
    try:
        from megatron.core.rerun_state_machine import RerunDataIterator
    except ImportError:  # a megatron-core without the rerun state machine
        return None
    return iterator if isinstance(iterator, RerunDataIterator) else None


# ---- tensor-parallel broadcast of the micro-batch and its payload (tokens_from: tp_src_rank) ------------------
def _broadcast_batch(tokens, loss_mask):
    mpu = _mpu()
    group, src = mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_src_rank()
    device = _device()
    meta = torch.zeros(3, dtype=torch.int64, device=device)
    if tokens is not None:
        meta[0], meta[1], meta[2] = tokens.shape[0], tokens.shape[1], int(loss_mask is not None)
    dist.broadcast(meta, src, group=group)
    b, s, has_mask = (int(x) for x in meta.tolist())
    t = tokens.to(device=device, dtype=torch.int64) if tokens is not None else torch.empty(b, s, dtype=torch.int64,
                                                                                          device=device)
    dist.broadcast(t, src, group=group)
    mask = None
    if has_mask:
        mask = loss_mask.to(device=device, dtype=torch.float32) if loss_mask is not None else torch.empty(
            b, s, dtype=torch.float32, device=device)
        dist.broadcast(mask, src, group=group)
    return t, mask


def _broadcast_payload(payload: Optional[TopKPayload]) -> TopKPayload:
    """The wire form (JSON header + raw buffers + checksum): no pickle, checked again on arrival."""
    mpu = _mpu()
    group, src = mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_src_rank()
    device = _device()
    size = torch.zeros(1, dtype=torch.int64, device=device)
    blob = None
    if payload is not None:
        blob = torch.frombuffer(bytearray(payload.to_bytes()), dtype=torch.uint8).to(device)
        size[0] = blob.numel()
    dist.broadcast(size, src, group=group)
    if blob is None:
        blob = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(blob, src, group=group)
    return payload if payload is not None else TopKPayload.from_bytes(blob.cpu().numpy().tobytes())


# ---- Megatron-LM: the KD block comes from the command line, read once its arguments are parsed -----------------
def add_kd_args(parser):
    """Megatron-LM `extra_args_provider` (of `parse_and_validate_args` from 0.18 on, of `pretrain()` before):
    adds `--kd-config` and `--kd-override`. `python -m kd_teacher.megatron_lm` adds it for you."""
    group = parser.add_argument_group(title="kd-teacher")
    group.add_argument("--kd-config", default=None, help="YAML file with a `kd:` block (knowledge distillation)")
    group.add_argument("--kd-override", nargs="*", default=[], help="dotted overrides, e.g. kd.alpha=0.5")
    return parser


class MegatronArgsForwardStep:
    """Megatron-LM parses its arguments after forward_step is handed over (inside `pretrain()` in releases
    before 0.18; `parse_and_validate_args` runs first from 0.18 on, but the model does not exist yet): build the
    hook on the first call, before the first micro-batch's forward (no weight has changed yet), from
    `--kd-config` / `--kd-override` of Megatron-LM's parsed arguments. `megatron`: what provides
    `get_args()` and `get_tokenizer()` (Megatron-LM's `megatron.training`)."""

    def __init__(self, forward_step: Callable, kwargs: dict, megatron=None):
        self.forward_step = forward_step
        self.kwargs = kwargs
        self.megatron = megatron
        self.inner: Optional[Callable] = None
        functools.update_wrapper(self, forward_step)

    def __call__(self, data_iterator, model, *args, **kwargs):
        if self.inner is None:
            self.inner = self._build(model)
        return self.inner(data_iterator, model, *args, **kwargs)

    def _build(self, model):
        from kd_teacher.hooks.config import load_kd_config

        if self.megatron is None:
            import megatron.training as megatron_training

            self.megatron = megatron_training
        args = self.megatron.get_args()
        if not getattr(args, "kd_config", None):
            return self.forward_step
        cfg = load_kd_config(args.kd_config, list(getattr(args, "kd_override", None) or []))
        if cfg.on_policy is not None:
            # Silently distilling the dataset's sequences instead would look like on-policy training in the logs.
            raise ConfigError(
                "kd.on_policy: on-policy distillation needs kd_teacher.onpolicy.OnPolicyIterator as the data "
                "iterator, and Megatron-LM's pretrain() builds its own from its datasets; drive a training loop "
                "with OnPolicyIterator (examples/onpolicy_kd.py, docs/onpolicy.md) or remove kd.on_policy")
        if _mpu().get_tensor_model_parallel_world_size() > 1:
            # Megatron-LM builds data iterators on tensor-parallel rank 0 only (get_batch_on_this_tp_rank).
            cfg.tokens_from = "tp_src_rank"
        # The KD block's vocabulary is the tokenizer's (NullTokenizer(V): V from megatron-core 0.18 on, V + 1
        # before), never Megatron-LM's padded one.
        kwargs = dict(self.kwargs)
        vocab = kwargs.pop("vocab_size", None) or cfg.vocab_size or self.megatron.get_tokenizer().vocab_size
        return wrap_forward_step(self.forward_step, cfg, model=model, vocab_size=vocab, **kwargs)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


# ---- the public entry point ---------------------------------------------------------------------------------
def wrap_forward_step(
    forward_step: Callable,
    kd,
    *,
    source: Optional[TeacherSource] = None,
    model=None,
    vocab_size: Optional[int] = None,
    batch_fields: Optional[BatchFields] = None,
    read_ahead: Optional[bool] = None,
):
    """Add KD to `forward_step`. `kd`: a `KDConfig`, the `kd:` mapping, or a YAML path; None returns
    `forward_step` unchanged (KD off); "megatron_args" reads `--kd-config` (see `add_kd_args`) from
    Megatron-LM's parsed arguments on the first call. Builds the teacher source unless `source` is given; pass
    `model` (the student) to have the precision recipe checked here rather than at the first micro-batch."""
    if kd is None:
        return forward_step
    if isinstance(kd, str) and kd == "megatron_args":
        return MegatronArgsForwardStep(forward_step, dict(source=source, vocab_size=vocab_size,
                                                          batch_fields=batch_fields, read_ahead=read_ahead))
    cfg = as_kd_config(kd)
    source = source if source is not None else make_teacher_source(cfg)
    return KDForwardStep(forward_step, cfg, source, model=model, vocab_size=vocab_size, batch_fields=batch_fields,
                         read_ahead=read_ahead)


__all__ = ["KDForwardStep", "MegatronArgsForwardStep", "wrap_forward_step", "add_kd_args", "default_batch_fields"]
