"""The `kd:` YAML block: which teacher, which loss, how payloads are fetched.

One block in the student's existing config turns distillation on. Everything here is checked at start-up
(`KDConfig.check`, then `make_teacher_source` and `wrap_forward_step` against the teacher and the run), so a
contradiction between the KD block and the run is an error before step 1, not a wrong loss at step 1000.

```yaml
kd:
  source: offline            # in_process | offline | remote
  k: 64
  temperature: 1.0
  kind: forward_kl           # forward_kl | reverse_kl | jsd
  alpha: 0.9                 # loss = alpha * KD + (1 - alpha) * the script's own CE
  offline: {dir: /data/teacher_dump}
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from kd_teacher.config import PATH, ConfigError, from_dict, load_config, load_yaml
from kd_teacher.onpolicy.config import OnPolicyConfig

SourceKind = Literal["in_process", "offline", "remote"]


@dataclass
class InProcessTeacherConfig:
    """A `TeacherEngine` on the student's own ranks: teacher TP equals the student's."""

    # A teacher YAML (`kd_teacher.engine.loading.TeacherConfig`: model, engine, checkpoint).
    config: str = field(metadata=PATH)
    # Overrides the teacher YAML's `checkpoint:`; a path that is not a checkpoint is a start-up error.
    checkpoint: Optional[str] = field(default=None, metadata=PATH)
    # Dotted overrides of the teacher YAML (e.g. `model.tensor_model_parallel_size=2` to match the student).
    overrides: list[str] = field(default_factory=list)
    # Random teacher weights are only right in tests and benchmarks: say so explicitly.
    allow_random_weights: bool = False


@dataclass
class OfflineTeacherConfig:
    """A dump written by `kd-teacher dump`, read by content (token hash) for any student layout."""

    dir: str = field(metadata=PATH)
    # What to do with a sequence the dump lacks: fail, or train that sequence on CE only (counted).
    missing: Literal["error", "ce_only"] = "error"


@dataclass
class KDConfig:
    source: SourceKind
    k: int
    temperature: float = 1.0
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    # How the teacher chose its k ids per token: "topk" (the largest logits), or "sampled" (k draws from its
    # distribution; forward KL only, an unbiased estimate of its gradient: docs/sampled_kd.md). A teacher or
    # dump of the other kind is refused at start-up.
    extraction: Literal["topk", "sampled"] = "topk"
    tail: bool = True
    beta: float = 0.5
    # Weight of the KD term; the script's own loss (cross-entropy) gets 1 - alpha.
    alpha: float = 1.0
    # The student's cross-entropy and the KD term from one pass over the logits, one gradient written
    # (kd_teacher/losses/ce_kd.py): the model's `compute_language_model_loss` is served by the fused pass while
    # forward_step runs (docs/kd_step.md: where it applies). Never with alpha = 0 (that run stays CE's, bitwise).
    fused_ce: bool = True
    # Tokens per chunk of the loss's fp32 working buffer (None: the whole micro-batch at once). Measured on an
    # H200 at [8192, 128256] bf16: same time as unchunked, extra peak memory 0.63 instead of 1.5 fp32 copies.
    chunk_tokens: Optional[int] = 1024
    # True (tokenizer) vocabulary of the student; payloads must match it. None: taken from the teacher.
    vocab_size: Optional[int] = None
    # The student's tokenizer (a directory, tokenizer.json, or NAME@DIGEST identity): a teacher whose payloads
    # name another tokenizer is refused, both named. None: not checked.
    tokenizer: Optional[str] = field(default=None, metadata=PATH)
    in_process: Optional[InProcessTeacherConfig] = None
    offline: Optional[OfflineTeacherConfig] = None
    # Passed to the streaming transport's own config class (kd_teacher.transport); checked there.
    remote: Optional[dict] = None
    # Micro-batches whose payload is requested ahead of use (sources with submit/result); 0: on demand.
    prefetch: int = 2
    # Seconds to wait for one payload before failing with a clear error (remote sources).
    timeout_s: float = 300.0
    # The payload's precision-recipe fingerprint must equal the student's unless this is set.
    allow_recipe_mismatch: bool = False
    # Which key of a micro-batch dict holds the token ids [b, s], and which the loss mask.
    tokens_key: str = "tokens"
    loss_mask_key: str = "loss_mask"
    # `data_iterator`: every rank that computes the loss reads its micro-batch itself (the data iterator
    # exists there). `tp_src_rank`: only tensor-parallel rank 0 reads it, as Megatron-LM's
    # get_batch_on_this_tp_rank does; the hook broadcasts tokens and payload to the other TP ranks.
    tokens_from: Literal["data_iterator", "tp_src_rank"] = "data_iterator"
    # Names of the metrics added to the report dict (prefix).
    report_prefix: str = "kd"
    # On-policy distillation: the student's own completions of prompts, scored by the teacher
    # (`kd_teacher.onpolicy`); None: the dataset's sequences.
    on_policy: Optional[OnPolicyConfig] = None

    def check(self) -> "KDConfig":
        """Values that are wrong whatever the run: raises ConfigError naming the key."""
        if self.k < 1:
            raise ConfigError(f"kd.k must be >= 1, got {self.k}")
        if not (0 < self.temperature < math.inf):
            raise ConfigError(f"kd.temperature must be a positive finite number, got {self.temperature}")
        if not (0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"kd.alpha must be in [0, 1], got {self.alpha}")
        if not (0.0 <= self.beta <= 1.0):
            raise ConfigError(f"kd.beta must be in [0, 1], got {self.beta}")
        if self.extraction == "sampled":
            self._check_sampled()
        if self.vocab_size is not None and self.vocab_size < self.k:
            raise ConfigError(f"kd.vocab_size {self.vocab_size} is smaller than kd.k {self.k}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ConfigError(f"kd.chunk_tokens must be >= 1 or null, got {self.chunk_tokens}")
        if self.prefetch < 0:
            raise ConfigError(f"kd.prefetch must be >= 0, got {self.prefetch}")
        if not self.timeout_s > 0:
            raise ConfigError(f"kd.timeout_s must be positive, got {self.timeout_s}")
        sections = {"in_process": self.in_process, "offline": self.offline, "remote": self.remote}
        if self.source not in sections:
            raise ConfigError(f"kd.source {self.source!r} is not one of {list(sections)}")
        section = sections[self.source]
        if section is None:
            raise ConfigError(f"kd.source is {self.source!r} but the kd.{self.source} section is missing")
        if self.on_policy is not None:
            self._check_on_policy()
        return self

    def _check_sampled(self) -> None:
        from kd_teacher.losses.sampled import why_not_sampled
        from kd_teacher.sampling import MAX_DRAWS

        why = why_not_sampled(self.kind, self.tail)
        if why is not None:
            raise ConfigError(f"kd.extraction: sampled with kd.kind={self.kind}, kd.tail={self.tail}: {why}")
        if self.k > MAX_DRAWS:
            raise ConfigError(f"kd.k={self.k} draws per token is more than the sampled kind's maximum of {MAX_DRAWS}")

    def _check_on_policy(self) -> None:
        self.on_policy.check()
        if self.source == "offline":
            raise ConfigError(
                "kd.on_policy: an offline teacher dump holds payloads for the dataset's sequences only and cannot "
                "score the student's new samples; use kd.source: in_process or remote for on-policy distillation"
            )
        if self.tokens_from != "data_iterator":
            raise ConfigError(
                "kd.on_policy: generation is a collective of every tensor-parallel rank, so the on-policy data "
                "iterator runs on each of them; set kd.tokens_from: data_iterator"
            )


def kd_config_from_dict(data: dict, where: str = "kd") -> KDConfig:
    return from_dict(KDConfig, data, where).check()


def load_kd_config(path: str | Path, overrides: Optional[list[str]] = None, section: str = "kd") -> KDConfig:
    """The `kd:` block of a YAML file (the student's own config, or a file holding only that block); its paths
    may be relative to the YAML's folder (`config.load_config`).

    Overrides use the full dotted path (`kd.alpha=0.5`) when reading a section.
    """
    return load_config(KDConfig, path, overrides, section or None).check()


def as_kd_config(kd: Any) -> KDConfig:
    """A `KDConfig` from a KDConfig, a dict (the `kd:` block) or a YAML path."""
    if isinstance(kd, KDConfig):
        return kd.check()
    if isinstance(kd, dict):
        return kd_config_from_dict(kd.get("kd", kd) if "source" not in kd else kd)
    if isinstance(kd, (str, Path)):
        data = load_yaml(kd)
        return load_kd_config(kd, section="kd" if "kd" in data else "")
    raise ConfigError(f"expected a KDConfig, a `kd:` mapping or a YAML path, got {type(kd).__name__}")
