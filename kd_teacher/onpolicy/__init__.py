"""On-policy distillation: the student samples completions through Megatron-Core's inference engine on its own
training model, the teacher scores them through the KD hook, the student trains on its own samples.

`OnPolicyIterator` replaces the training script's data iterator (prompts in, micro-batches of prompt +
completion out); `OnPolicyConfig` is the `kd.on_policy` block; `StudentGenerator` is the generation step alone.
See docs/onpolicy.md.
"""

from kd_teacher.onpolicy.config import OnPolicyConfig
from kd_teacher.onpolicy.generation import GenerationError, Rollout, StudentGenerator
from kd_teacher.onpolicy.iterator import OnPolicyIterator, check_prompts, load_prompts, micro_batch

__all__ = ["OnPolicyConfig", "OnPolicyIterator", "StudentGenerator", "Rollout", "GenerationError", "check_prompts",
           "load_prompts", "micro_batch"]
