"""kd-teacher: teacher serving for knowledge distillation on Megatron-Core.

Public API, in data-flow order: `TeacherEngine` (teacher mode) and `vocab_parallel_topk` (or, for the sampled
kind, `vocab_parallel_sample`) produce a `TopKPayload`, whose header carries the `TeacherContract` (what the teacher serves, checked with one
`check(expected)` wherever payloads are used); `OfflineTeacher` (dumps) and `RemoteTeacher` (streaming) serve
payloads from elsewhere; `wrap_forward_step` + `KDConfig` add KD to a Megatron-Core training loop; `kd_loss` / `kd_loss_and_report`
are the vocab-parallel losses.
"""

import importlib

from kd_teacher.contract import ContractMismatchError, TeacherContract
from kd_teacher.payload import PayloadError, PayloadHeader, TokenMismatchError, TopKPayload, token_hash
from kd_teacher.sampling import vocab_parallel_sample
from kd_teacher.topk import vocab_parallel_topk

__version__ = "0.1.0"

# Names whose modules pull in Megatron-Core, safetensors or the transports: imported on first use, so that a
# payload-only user (a reader of the wire format) stays light.
_LAZY = {
    "TeacherEngine": "kd_teacher.engine.engine",
    "EngineConfig": "kd_teacher.engine.engine",
    "OfflineTeacher": "kd_teacher.offline.reader",
    "kd_loss": "kd_teacher.losses",
    "kd_loss_and_report": "kd_teacher.losses",
    "payload_for_cp_rank": "kd_teacher.losses",
    "wrap_forward_step": "kd_teacher.hooks",
    "KDConfig": "kd_teacher.hooks",
    "RemoteTeacher": "kd_teacher.transport",
    "RemoteTeacherConfig": "kd_teacher.transport",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kd_teacher' has no attribute {name!r}")


__all__ = [
    "TopKPayload", "PayloadHeader", "PayloadError", "TokenMismatchError", "token_hash", "TeacherContract",
    "ContractMismatchError",
    "vocab_parallel_topk", "vocab_parallel_sample", *_LAZY,
]
