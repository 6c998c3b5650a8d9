"""kd-teacher: teacher serving for knowledge distillation on Megatron-Core.

Public API: the payload (`TopKPayload`), its extraction (`vocab_parallel_topk`) and the teacher engine
(`TeacherEngine`); the loss, offline reader and hooks are added by their modules.
"""

from kd_teacher.engine.topk import vocab_parallel_topk
from kd_teacher.payload import PayloadError, PayloadHeader, TokenMismatchError, TopKPayload, token_hash

__version__ = "0.1.0"


def __getattr__(name):
    # TeacherEngine pulls in Megatron-Core: import it lazily so that payload-only users stay light.
    if name in ("TeacherEngine", "EngineConfig"):
        from kd_teacher.engine import engine

        return getattr(engine, name)
    if name == "OfflineTeacher":  # reads dumps with safetensors/numpy only, but keep the import lazy too
        from kd_teacher.offline.reader import OfflineTeacher

        return OfflineTeacher
    if name in ("kd_loss", "kd_loss_and_report", "payload_for_cp_rank"):  # the student-side KD losses
        from kd_teacher import losses

        return getattr(losses, name)
    if name in ("wrap_forward_step", "KDConfig"):  # the training-loop hook (kd_teacher.hooks)
        from kd_teacher import hooks

        return getattr(hooks, name)
    if name in ("RemoteTeacher", "RemoteTeacherConfig"):  # the streaming teacher's client (kd_teacher.transport)
        from kd_teacher import transport

        return getattr(transport, name)
    raise AttributeError(f"module 'kd_teacher' has no attribute {name!r}")


__all__ = [
    "TopKPayload", "PayloadHeader", "PayloadError", "TokenMismatchError", "token_hash",
    "vocab_parallel_topk", "TeacherEngine", "EngineConfig", "OfflineTeacher",
    "wrap_forward_step", "KDConfig", "kd_loss", "kd_loss_and_report", "payload_for_cp_rank",
    "RemoteTeacher", "RemoteTeacherConfig",
]
