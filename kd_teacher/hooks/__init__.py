"""The student-side training-loop hook: KD added to a Megatron-Core `forward_step` with one YAML block.

`wrap_forward_step(forward_step, kd_config)` is the one line; `KDConfig` is the `kd:` block;
`make_teacher_source` builds the in-process, offline or remote teacher it names.
"""

from kd_teacher.hooks.config import KDConfig, load_kd_config
from kd_teacher.hooks.forward_step import KDForwardStep, add_kd_args, wrap_forward_step
from kd_teacher.hooks.sources import (
    InProcessSource,
    OfflineSource,
    RemoteSource,
    TeacherSource,
    make_teacher_source,
)

__all__ = [
    "KDConfig", "load_kd_config", "KDForwardStep", "wrap_forward_step", "add_kd_args", "TeacherSource",
    "InProcessSource", "OfflineSource", "RemoteSource", "make_teacher_source",
]
