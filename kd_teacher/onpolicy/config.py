"""The `on_policy:` section of the `kd:` block: the student generates, the teacher scores what it generated.

```yaml
kd:
  source: in_process          # or remote; an offline dump cannot score new samples
  k: 64
  kind: reverse_kl            # the usual on-policy objective (GKD / "on-policy distillation")
  on_policy:
    prompts: data/prompts.jsonl   # one prompt per line: a JSON list of token ids, or {"tokens": [...]}
    lmbda: 1.0                    # fraction of micro-batches that are the student's own samples (GKD's lambda)
    max_new_tokens: 128
    temperature: 1.0
    top_k: 0                      # 0: off; 1: greedy
    top_p: 1.0                    # (0, 1]; 1.0: off
    eos_id: 0                     # stop a completion at this id (null: always max_new_tokens)
    generate_every: 1             # optimizer steps served by one generation round
    seed: 1234
```

Everything here is checked before the first step (`OnPolicyConfig.check`, then the iterator against the
model and the prompts); see docs/onpolicy.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from kd_teacher.config import PATH, ConfigError


@dataclass
class OnPolicyConfig:
    # JSONL file of prompts (token ids; relative to the YAML's folder if not found here); None: the prompts are
    # handed to `OnPolicyIterator` in code.
    prompts: Optional[str] = field(default=None, metadata=PATH)
    # GKD's lambda: each micro-batch is the student's own sample with this probability (seeded), else the next
    # micro-batch of the dataset iterator (which is then required).
    lmbda: float = 1.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    # Megatron-Core's sampling cannot combine top-k and top-p: set at most one of them.
    top_k: int = 0
    top_p: float = 1.0
    eos_id: Optional[int] = None
    # One generation round makes the micro-batches of this many optimizer steps (the later ones are then up to
    # generate_every - 1 steps off-policy, in exchange for larger generation batches).
    generate_every: int = 1
    # Prompts per call into Megatron-Core's engine (its KV cache is this many sequences); None: a whole round.
    generation_batch_size: Optional[int] = None
    seed: int = 1234
    # "dynamic": Megatron-Core's DynamicInferenceEngine (paged KV cache; needs CUDA and FlashAttention);
    # "static": its TextGenerationController's static-batch loop (runs anywhere, CPU included); "auto": dynamic
    # where it runs, else static.
    engine: Literal["auto", "dynamic", "static"] = "auto"
    # Megatron-Core's batch-invariant kernels (Triton, CUDA only), process-wide: generation and training alike.
    batch_invariant: bool = False
    # Add `onpolicy logprob gap` (sampling-time vs training-forward log-prob of each generated token) to the
    # step's report dict.
    report_logprob_gap: bool = True

    def check(self) -> "OnPolicyConfig":
        """Values that are wrong whatever the run: raises ConfigError naming the key and the allowed values."""
        if self.max_new_tokens <= 0:
            raise ConfigError(f"kd.on_policy.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"kd.on_policy.top_p must be in (0, 1] (1.0 = no nucleus filtering), got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"kd.on_policy.top_k must be >= 0 (0 = off, 1 = greedy), got {self.top_k}")
        if self.top_k > 0 and self.top_p < 1.0:
            raise ConfigError(
                f"kd.on_policy: top_k={self.top_k} and top_p={self.top_p} are both set; Megatron-Core's sampling "
                "applies one of them, so set top_k: 0 or top_p: 1.0"
            )
        if not (0.0 < self.temperature < math.inf):
            raise ConfigError(f"kd.on_policy.temperature must be a positive finite number, got {self.temperature}")
        if not (0.0 <= self.lmbda <= 1.0):
            raise ConfigError(f"kd.on_policy.lmbda must be in [0, 1], got {self.lmbda}")
        if self.generate_every < 1:
            raise ConfigError(f"kd.on_policy.generate_every must be >= 1, got {self.generate_every}")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ConfigError(
                f"kd.on_policy.generation_batch_size must be >= 1 or null, got {self.generation_batch_size}")
        if self.engine not in ("auto", "dynamic", "static"):
            raise ConfigError(f"kd.on_policy.engine must be one of auto, dynamic, static; got {self.engine!r}")
        if self.eos_id is not None and self.eos_id < 0:
            raise ConfigError(f"kd.on_policy.eos_id must be a token id >= 0 or null, got {self.eos_id}")
        return self
