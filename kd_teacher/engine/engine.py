"""`TeacherEngine`: a Megatron-Core model in teacher mode, scoring token batches into `TopKPayload`s.

The data path, top to bottom (`score_many`):
  schedule  - pack requests into micro-batches up to a token budget (`engine.repacking`: off, proven, any)
  execute   - the model's own forward through Megatron-Core's pipeline schedule, forward-only, in teacher
              mode (eval, no grad; the FP8 context is the one `TransformerBlock` applies from the config)
  top-k     - on the last pipeline stage, vocab-parallel top-k + LSE over the TP group, run on the output
              layer's logits inside the forward (`output_tap`: GPTModel's own [b, s, V] copy is never made)
  payload   - split back per request, header with token hashes and fingerprints; broadcast over the
              pipeline group so every stage can hand it to its caller

The training-path forward (`training_logits`) runs the very same schedule call in train mode with grad
enabled and dropout off: the consistency contract compares the two.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.distributed as dist

from kd_teacher.config import PATH, ConfigError
from kd_teacher.engine.checkpoint import CheckpointMismatchError, load_checkpoint
from kd_teacher.engine.fp8_state import preserved_fp8_state, reset_fp8_weight_caches
from kd_teacher.engine.invariance import load_proven_shapes
from kd_teacher.engine.model import ModelConfig, build_gpt_model
from kd_teacher.engine.moe_policy import moe_serving
from kd_teacher.engine.output_tap import OutputLayerTap
from kd_teacher.engine.scheduler import ScoreRequest, TokenBudgetScheduler
from kd_teacher.topk import check_finite_lse, vocab_parallel_topk
from kd_teacher.contract import TeacherContract
from kd_teacher.dtypes import DTYPE_NAMES, INDEX_DTYPE
from kd_teacher.payload import (EXTRACTIONS, PayloadError, PayloadHeader, TopKPayload, check_token_ids, counts_dtype,
                                token_hashes)
from kd_teacher.sampling import MAX_DRAWS, check_seed, token_seeds, vocab_parallel_sample
from kd_teacher.precision import PrecisionRecipe, require_fp8_support, serving_policy
from kd_teacher.tokenizer_identity import find_tokenizer, tokenizer_identity

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """How the engine serves: the payload it produces and how it batches."""

    k: int = 64  # ids per token: the top k, or (extraction: sampled) k draws
    temperature: float = 1.0
    # "topk": the k largest logits. "sampled": k ids drawn from the teacher's distribution at `temperature`,
    # stored as distinct ids with counts (kd_teacher.sampling; k <= sampling.MAX_DRAWS).
    extraction: Literal["topk", "sampled"] = "topk"
    # Sampled payloads: draws are a function of (sequence hash, position, sample_seed) only.
    sample_seed: int = 0
    max_tokens_per_batch: int = 16384
    # Requests of several students (or lengths) in shared forwards (`kd_teacher.precision`, its table):
    # off: each request as given; proven: only into forward shapes `invariance_table` proves bitwise equal;
    # any: any shape (opt-in, warned). None: proven with a table, else off. Never with a batch-wide FP8 scale
    # or a MoE model (an error).
    repacking: Optional[Literal["off", "proven", "any"]] = None
    # A benchmarks/batch_invariance.py JSON measured on this machine for this model shape (engine.invariance).
    invariance_table: Optional[str] = field(default=None, metadata=PATH)
    # FP8 delayed scaling: serve a checkpoint that carries no FP8 scales with the initial ones (1.0).
    # Off by default: teacher passes never update scales, so such a teacher is not the one that trained.
    accept_initial_fp8_scales: bool = False
    # MoE teachers: serve one that drops tokens (a capacity factor) anyway. Off by default: dropping makes a
    # token's top-k depend on its micro-batch (`moe_policy`). The choice is part of the teacher fingerprint.
    accept_moe_token_dropping: bool = False
    # Take the top-k from the output layer's logits inside the forward, so GPTModel's [b, s, V] copy of them is
    # never made (`output_tap`; checked against the untapped forward on the first call). Off: from the logits
    # the model returns.
    extract_at_output_layer: bool = True

    def __post_init__(self):
        # Here, not at the first forward: a dump or a server must not start (and write) with a config that
        # cannot serve.
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k!r}")
        if not 0 < self.temperature < math.inf:  # NaN fails too
            raise ConfigError(f"temperature must be a positive finite number, got {self.temperature!r}")
        if self.max_tokens_per_batch < 1:
            raise ConfigError(f"max_tokens_per_batch must be >= 1, got {self.max_tokens_per_batch!r}")
        if self.extraction not in EXTRACTIONS:
            raise ConfigError(f"extraction {self.extraction!r} is not one of {list(EXTRACTIONS)}")
        if self.extraction == "sampled":
            if self.k > MAX_DRAWS:
                raise ConfigError(f"k={self.k} draws per token is more than the sampled kind's maximum of {MAX_DRAWS}")
            try:
                check_seed(self.sample_seed)
            except ValueError as e:
                raise ConfigError(str(e)) from None


def _mpu():
    from megatron.core import parallel_state

    return parallel_state


@contextlib.contextmanager
def teacher_mode(model: torch.nn.Module, modules: Optional[list] = None):
    """eval() and no_grad for the duration; restores the module's train flags afterwards.

    no_grad rather than inference_mode: Megatron modules cache tensors (rotary tables, TE weight casts)
    that a later training forward of the same model must be able to use in autograd. `modules`: the model's
    `list(model.modules())`, if the caller keeps one (walking the module tree is most of this context's cost).
    """
    flags = _train_flags(model, modules)
    if not any(f for _, f in flags):
        flags = []  # already in eval (a served teacher): nothing to set, nothing to restore
    _set_training(flags, False)
    try:
        # FP8 delayed scaling: a teacher pass must leave no amax behind for a later training step.
        with torch.no_grad(), _fp8_state_guard(model):
            yield
    finally:
        _restore_train_flags(flags)


def _train_flags(model: torch.nn.Module, modules: Optional[list] = None) -> list:
    return [(m, m.training) for m in (model.modules() if modules is None else modules)]


def _set_training(flags: list, mode: bool) -> None:
    # What model.train(mode) does, without nn.Module.__setattr__'s checks on every one of a GPT's few hundred
    # modules: entering and leaving teacher mode cost ~1.7 ms of CPU per pass that way, time in which the GPU
    # waits for the forward to be launched.
    for m, _ in flags:
        _set_module_training(m, mode)


def _restore_train_flags(flags: list) -> None:
    # Module by module, not m.train(f): train() recurses into every submodule, which made restoring a 1.5B
    # TE model's flags cost ~9 ms of CPU per teacher pass (quadratic in depth x modules). Modules come in
    # pre-order, so a parent's own train() runs before its children get their own flags back.
    for m, f in flags:
        _set_module_training(m, f)


def _set_module_training(m: torch.nn.Module, mode: bool) -> None:
    if type(m).train is torch.nn.Module.train:
        m.__dict__["training"] = mode
    else:  # a module that overrides train() still gets its own call
        m.train(mode)


def _fp8_state_guard(model: torch.nn.Module):
    """Snapshot/restore of TE's delayed-scaling state, only when the model runs FP8 at all."""
    if getattr(getattr(model, "config", None), "fp8", None):
        return preserved_fp8_state(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def training_path(model: torch.nn.Module):
    """train() with dropout off and grad enabled: the forward a training step would run."""
    flags = _train_flags(model)
    # Dropout lives in nn.Dropout modules and, for Megatron's fused bias-dropout-add, in a float
    # `hidden_dropout` attribute each TransformerLayer copies from the config at construction.
    saved = [(m, "p", m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved += [(m, "hidden_dropout", m.hidden_dropout) for m in model.modules()
              if isinstance(getattr(m, "hidden_dropout", None), float)]
    model.train()
    for m, attr, _ in saved:
        setattr(m, attr, 0.0)
    try:
        # A grad-enabled FP8 forward updates delayed-scaling scales on exit; the comparison with teacher
        # mode needs both to run under the same recipe state, so that update is undone.
        with torch.enable_grad(), _fp8_state_guard(model):
            yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)
        _restore_train_flags(flags)


def teacher_fingerprint(model: torch.nn.Module, model_config: Optional[dict] = None,
                        serving: Optional[dict] = None) -> str:
    """Stable hash of the weights (every TP/PP shard, and every EP shard of MoE experts), the model config and
    the serving choices that change outputs (`serving`, e.g. MoE token dropping): one teacher, one fingerprint."""
    dense, experts = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    has_experts = False
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor) or "_extra_state" in name:
            continue
        # Experts are split over EP ranks that hold the same dense weights (EP runs beside TP/PP): hashed apart
        # and gathered over the expert groups, so every rank ends with the same fingerprint.
        h = experts if ".mlp.experts." in name else dense
        has_experts |= h is experts
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    mpu = _mpu()
    parallel = dist.is_initialized() and mpu.model_parallel_is_initialized()
    blob = {"shards": _gathered(dense.hexdigest(), mpu.get_model_parallel_group() if parallel else None),
            "config": model_config or {}}
    if has_experts:
        group = mpu.get_expert_tensor_model_pipeline_parallel_group() if parallel else None
        blob["expert_shards"] = _gathered(experts.hexdigest(), group)
    if serving:
        blob["serving"] = serving
    return hashlib.blake2b(json.dumps(blob, sort_keys=True).encode(), digest_size=16).hexdigest()


def _gathered(local: str, group) -> list:
    if group is None:
        return [local]
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    return parts


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaNs included (torch.equal says NaN != NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(as_int), b.contiguous().view(as_int)
    return torch.equal(a, b)


class TeacherEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int,
        config: Optional[EngineConfig] = None,
        *,
        model_config: Optional[ModelConfig] = None,
        fingerprint: Optional[str] = None,
        tokenizer: Optional[str] = None,
    ):
        """`tokenizer`: the teacher's tokenizer (a directory or tokenizer.json, or its identity string): its
        identity goes into every payload header, so a student with another tokenizer is refused."""
        self.model = model
        self._modules = list(model.modules())  # the tree does not change; teacher mode walks this list
        self.tconfig = model.config
        self.vocab_size = int(vocab_size)
        config = config or EngineConfig()
        self.config = config
        self.model_config = model_config
        self.recipe = PrecisionRecipe.from_transformer_config(self.tconfig)
        require_fp8_support(self.recipe, model)
        self.moe = moe_serving(self.tconfig, config.accept_moe_token_dropping)
        self.policy = serving_policy(self.recipe, config.repacking, invariance_table=config.invariance_table,
                                     model_batch_dependence=self.moe.batch_dependence if self.moe else None)
        proven = None
        if self.policy.repacking == "proven":
            if model_config is None:
                raise ConfigError("engine.repacking=proven needs the teacher's model config to find its shape in "
                                  f"{config.invariance_table} (build the engine with model_config=)")
            proven = load_proven_shapes(config.invariance_table, model_config)
        # Sequence parallelism splits the sequence over the TP ranks: forwards are padded to a multiple of TP.
        tp = _mpu().get_tensor_model_parallel_world_size() if self.tconfig.sequence_parallel else 1
        self.scheduler = TokenBudgetScheduler(config.max_tokens_per_batch, repacking=self.policy.repacking,
                                              seq_multiple=tp, proven=proven)
        self._check_vocab()
        if config.k > self.vocab_size:
            raise ValueError(f"k={config.k} is larger than the true vocabulary size {self.vocab_size}")
        self.fingerprint = fingerprint or self._fingerprint()
        self.recipe_fingerprint = self.recipe.fingerprint()
        self.tokenizer_identity = tokenizer_identity(tokenizer) if tokenizer is not None else None
        self._tap = OutputLayerTap.for_model(self._modules) if config.extract_at_output_layer else None
        self._tap_checked = False

    @property
    def contract(self) -> TeacherContract:
        """What this engine serves (its payloads' values dtype is known once it has scored)."""
        return TeacherContract(vocab_size=self.vocab_size, k=self.config.k, temperature=float(self.config.temperature),
                               extraction=self.config.extraction, teacher_fingerprint=self.fingerprint,
                               recipe_fingerprint=self.recipe_fingerprint, tokenizer_identity=self.tokenizer_identity)

    @property
    def extraction_site(self) -> str:
        """Where teacher mode takes the top-k: "output_layer" (inside the forward, see `output_tap`) or
        "returned_logits" (from what the model's forward returns)."""
        return "output_layer" if self._tap is not None else "returned_logits"

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: str | Path, model_config: ModelConfig, config: Optional[EngineConfig] = None,
        iteration: Optional[int] = None, *, tokenizer: Optional[str] = None,
    ) -> "TeacherEngine":
        """Build the model for this rank's layout and load a `megatron.core.dist_checkpointing` checkpoint
        (or a Megatron-LM `--save` directory's latest one, or its `iteration`: `resolve_checkpoint_dir`)."""
        model, tconfig = build_gpt_model(model_config)
        config = config or EngineConfig()
        load_checkpoint(model, checkpoint_dir, recipe=PrecisionRecipe.from_transformer_config(tconfig),
                        accept_initial_fp8_scales=config.accept_initial_fp8_scales, iteration=iteration)
        return cls(model, model_config.vocab_size, config, model_config=model_config, tokenizer=tokenizer)

    @classmethod
    def from_hf(
        cls,
        path: str | Path,
        config: Optional[EngineConfig] = None,
        *,
        model_config: Optional[ModelConfig] = None,
        overrides: Optional[dict] = None,
        tokenizer: Optional[str] = None,
    ) -> "TeacherEngine":
        """Load a Hugging Face checkpoint (config.json + *.safetensors; Llama 3.x, Mistral, Qwen2/2.5, Qwen3,
        Qwen3-MoE, Mixtral) into Megatron-Core's GPT, this rank reading only its shard of each tensor.

        `model_config`: the `ModelConfig` to build, as `kd_teacher.hf.model_config_from_hf(path, ...)` gives it;
        None: made from config.json with the parallel layout parallel_state is initialised with and
        `overrides` (ModelConfig fields, e.g. {"layer_spec": "transformer_engine"}). `tokenizer`: as for
        `__init__`; None: the tokenizer files in `path`, if any.
        """
        from kd_teacher.hf.load import build_hf_model

        model, model_config = build_hf_model(path, model_config, overrides)
        return cls(model, model_config.vocab_size, config, model_config=model_config,
                   tokenizer=tokenizer or find_tokenizer(path))

    # ---- weights changing in place ------------------------------------------------------------------------
    def reset_fp8_caches(self) -> int:
        """Make Transformer Engine re-cast the weights to FP8 on the next forward (after they changed in
        place); returns the number of TE layers reset. The engine's schedule calls do this at every call too,
        so this matters for forwards outside the engine."""
        return reset_fp8_weight_caches(self.model)

    def reload_weights(self, source) -> None:
        """Load new teacher weights in place: a checkpoint directory or a state dict of this rank's shard.

        Resets the FP8 weight-cast caches and recomputes the teacher fingerprint, so payloads made after
        the reload are traceable to the new weights.
        """
        if isinstance(source, (str, Path)):
            load_checkpoint(self.model, source, recipe=self.recipe,
                            accept_initial_fp8_scales=self.config.accept_initial_fp8_scales)
        else:
            # Checked before anything is copied: a bad state dict leaves the served weights untouched.
            current = {k: v for k, v in self.model.state_dict().items() if "_extra_state" not in k}
            given = {k: v for k, v in source.items() if "_extra_state" not in k}
            missing, unexpected = sorted(set(current) - set(given)), sorted(set(given) - set(current))
            wrong = [k for k in set(current) & set(given) if tuple(current[k].shape) != tuple(given[k].shape)]
            if missing or unexpected or wrong:
                raise CheckpointMismatchError(
                    f"new teacher weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                    f"wrong shape {sorted(wrong)[:5]}"
                )
            with torch.no_grad():
                self.model.load_state_dict(source, strict=False)
        self.reset_fp8_caches()
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        return teacher_fingerprint(self.model, asdict(self.model_config) if self.model_config is not None else None,
                                   self.moe.record() if self.moe else None)

    def _check_vocab(self) -> None:
        padded = getattr(self.model, "vocab_size", None)
        if padded is not None and self.vocab_size > padded:
            raise ValueError(
                f"true vocab size {self.vocab_size} is larger than the model's padded vocabulary {padded}"
            )

    # ---- the data path ------------------------------------------------------------------------------------
    def score(
        self,
        tokens: torch.Tensor,
        *,
        sample_ids: Optional[Sequence[int]] = None,
        request_id: Optional[str] = None,
        check_finite: bool = True,
    ) -> TopKPayload:
        """Payload for one micro-batch of token ids [b, s], computed exactly as that micro-batch."""
        return self.score_many([ScoreRequest(tokens, list(sample_ids) if sample_ids is not None else None,
                                             request_id)], check_finite=check_finite)[0]

    def score_many(self, requests: list[ScoreRequest], out: Optional[list] = None,
                   check_finite: bool = True) -> list[TopKPayload]:
        """Payloads for many requests, batched by the scheduler; one payload per request, in order. `out`: per
        request, None or (values, indices, lse) tensors to write that payload into (a transport's reply buffer,
        `DistServer.payload_views`), so that it goes out without another copy. `check_finite=False` leaves the
        LSE's finiteness (one host read, which waits for the forwards) to a caller that checks it on the device
        later, as the KD loss does (`kd_teacher.losses.kd`)."""
        if out is not None and len(out) != len(requests):
            raise ValueError(f"score_many got {len(out)} destinations for {len(requests)} requests (out=)")
        checked, hosts = [], []
        for req in requests:  # the caller's requests stay as they are: checked copies go forward
            tokens, host = self._checked_tokens(req.tokens)
            checked.append(replace(req, tokens=tokens))
            hosts.append(host)
        requests = checked
        # Sampled draws are seeded by the token hashes, so these are needed before the forwards (else after).
        hashes = [token_hashes(h) for h in hosts] if self.config.extraction == "sampled" else None
        rows: list[list] = [[None] * req.tokens.shape[0] for req in requests]
        for batch in self.scheduler.plan(requests):
            tokens = TokenBudgetScheduler.gather_tokens(requests, batch)
            seeds = None
            if hashes is not None:  # right-padded rows: a row's own hash, positions 0.. of the padded length
                seeds = token_seeds([hashes[i][r] for i, r, _ in batch.rows], tokens.shape[1],
                                    self.config.sample_seed, device=tokens.device)
            with teacher_mode(self.model, self._modules):
                results = self._forward_topk(tokens, seeds)
            if self._tap is not None and not self._tap_checked:
                results = self._first_forward_checked(tokens, seeds, results)
            values, indices, lse = results
            for j, (i, r, length) in enumerate(batch.rows):
                rows[i][r] = (values[j, :length], indices[j, :length], lse[j, :length])
        # Hashed once the forwards are queued: the host works while the GPU runs them.
        into = out if out is not None else [None] * len(requests)
        hashes = hashes or [token_hashes(h) for h in hosts]
        payloads = [self._payload(req, r, h, dst) for req, r, h, dst in zip(requests, rows, hashes, into)]
        if check_finite:
            check_finite_lse([p.lse for p in payloads])
        return payloads

    def _forward_topk(self, tokens: torch.Tensor, seeds: Optional[torch.Tensor] = None, tapped: bool = True):
        """Forward through the pipeline schedule; top-k (or, given `seeds` [b, s], the sampled ids) on the last
        stage; result on every PP stage."""
        cfg = self.config
        group = _mpu().get_tensor_model_parallel_group()

        def extract(logits, seq_major: bool):
            if seeds is not None:
                counts, ids, lse = vocab_parallel_sample(
                    logits, cfg.k, seeds.t() if seq_major else seeds, temperature=cfg.temperature,
                    vocab_size=self.vocab_size, group=group,
                )
                return counts.to(counts_dtype(logits.dtype, cfg.k)), ids, lse
            return vocab_parallel_topk(
                logits, cfg.k, temperature=cfg.temperature, vocab_size=self.vocab_size, group=group,
                check_finite=False,  # checked once per score_many, after all its host work is queued
            )

        if self._tap is not None and tapped:  # the tap hands over the output layer's [s, b, V/TP]
            results = self._tap.run(lambda: self._run_schedule(tokens, lambda empty: None),
                                    lambda logits: extract(logits, True))
        else:
            results = self._run_schedule(tokens, lambda logits: extract(logits, False))
        return self._broadcast_from_last_stage(results, tokens.shape)

    def _first_forward_checked(self, tokens: torch.Tensor, seeds: Optional[torch.Tensor], tapped: tuple) -> tuple:
        """The output-layer tap checked once, on the engine's first forward, against the untapped forward of the
        same tokens: kept only if the two agree bit for bit on every rank (a Megatron-Core version that changes
        the logits after the output layer would make them differ). Returns the results to serve."""
        # A teacher_mode of its own: FP8 delayed-scaling state is restored between the two forwards, so both
        # run under the same scales.
        with teacher_mode(self.model, self._modules):
            plain = self._forward_topk(tokens, seeds, tapped=False)
        same = torch.tensor([float(all(_bitwise_equal(a, b) for a, b in zip(tapped, plain)))],
                            device=next(self.model.parameters()).device)
        mpu = _mpu()
        if dist.is_initialized() and mpu.model_parallel_is_initialized():
            dist.all_reduce(same, op=dist.ReduceOp.MIN, group=mpu.get_model_parallel_group())
        self._tap_checked = True
        if same.item() == 1.0:
            return tapped
        log.warning("top-k taken at the output layer differs from top-k of the model's returned logits with this "
                    "model/Megatron-Core version: teacher mode extracts from the returned logits from now on")
        self._tap = None
        return plain

    def _payload(self, req: ScoreRequest, rows: list, hashes: list, dst: Optional[tuple] = None) -> TopKPayload:
        if dst is None:
            values = torch.stack([r[0] for r in rows])
            indices = torch.stack([r[1] for r in rows]).to(INDEX_DTYPE)
            lse = torch.stack([r[2] for r in rows])
        else:
            values, indices, lse = dst
            for into, j in ((values, 0), (indices, 1), (lse, 2)):
                part = [r[j] for r in rows]
                if into.dtype == part[0].dtype and into.device == part[0].device:
                    torch.stack(part, out=into)
                else:  # another dtype (int64 ids into int32) or device: the same one copy as above
                    into.copy_(torch.stack(part))
        b, s = req.tokens.shape
        header = PayloadHeader(**{**vars(self.contract), "values_dtype": DTYPE_NAMES[values.dtype]}, batch=b,
                               seq_len=s, token_hashes=hashes, sample_ids=req.sample_ids, request_id=req.request_id)
        return TopKPayload(values, indices, lse, header)

    # ---- forward machinery ------------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._checked_tokens(tokens)[0]

    def _checked_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens on the model's device as int64, the same on the host). One host copy, made before the forward
        is queued: the range check and the payload's token hashes read it, so nothing waits for the GPU after
        the forward is launched (a hash of device tokens there would hold the host until the forward ends)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise PayloadError(f"tokens must be a [batch, seq] tensor, got {getattr(tokens, 'shape', type(tokens))}")
        if tokens.numel() == 0:
            raise PayloadError(f"empty batch: tokens shape {tuple(tokens.shape)}")
        check_token_ids(tokens)
        host = tokens.detach().to(device="cpu", dtype=torch.int64)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= self.vocab_size:
            raise PayloadError(f"token ids out of range: [{lo}, {hi}] for vocabulary size {self.vocab_size}")
        device = next(self.model.parameters()).device
        # Queued behind the GPU's work, not waited for: a data loader's page-locked ids (Megatron-LM's) copy
        # without holding the host (torch's host allocator keeps their memory until the copy has run).
        return tokens.to(device=device, dtype=torch.long, non_blocking=True), host

    def _run_schedule(self, tokens: torch.Tensor, on_logits):
        """One micro-batch through `get_forward_backward_func()` forward-only; on the last stage, returns
        `on_logits(logits [b, s, V/TP])`, elsewhere None."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, s = tokens.shape
        position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
        out = {}

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], None)

            def collect(output_tensor, non_loss_data=True):
                out["result"] = on_logits(output_tensor)
                return torch.zeros(())

            return output, collect

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([{"tokens": tokens, "position_ids": position_ids}]),
            model=[self.model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
            collect_non_loss_data=True,
        )
        return out.get("result")

    def _broadcast_from_last_stage(self, results, shape):
        mpu = _mpu()
        if mpu.get_pipeline_model_parallel_world_size() == 1:
            return results
        b, s = shape
        k = self.config.k
        device = next(self.model.parameters()).device
        if results is None:
            values_dtype = self.tconfig.params_dtype
            if self.config.extraction == "sampled":
                values_dtype = counts_dtype(values_dtype, k)
            results = (
                torch.empty(b, s, k, dtype=values_dtype, device=device),
                torch.empty(b, s, k, dtype=torch.int64, device=device),
                torch.empty(b, s, dtype=torch.float32, device=device),
            )
        else:
            results = tuple(t.contiguous() for t in results)  # the tap's are transposed views
        src = mpu.get_pipeline_model_parallel_last_rank()
        group = mpu.get_pipeline_model_parallel_group()
        for t in results:
            dist.broadcast(t, src=src, group=group)
        return results

    # ---- the training-path forward, for the consistency contract ------------------------------------------
    def training_logits(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits shard [b, s, V/TP] of the training-path forward (train mode, grad on, dropout off);
        None off the last pipeline stage."""
        tokens = self._check_tokens(tokens)
        with training_path(self.model):
            logits = self._run_schedule(tokens, lambda x: x.detach().clone())
        return logits

    def teacher_logits(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits shard of the teacher-mode forward; None off the last pipeline stage."""
        tokens = self._check_tokens(tokens)
        with teacher_mode(self.model):
            return self._run_schedule(tokens, lambda x: x.clone())
