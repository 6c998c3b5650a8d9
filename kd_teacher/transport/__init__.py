"""Streaming teacher transport: a teacher server (`kd-teacher serve`) and its student client `RemoteTeacher`,
over torch.distributed point-to-point (NCCL / gloo) or a shared-memory ring in /dev/shm."""

from kd_teacher.transport.client import Handle, RemoteTeacher, RemoteTeacherConfig, make_client
from kd_teacher.transport.protocol import (
    IncompatibleTeacherError,
    ProtocolError,
    RequestRejectedError,
    ServerInfo,
    TeacherTimeoutError,
    TeacherUnavailableError,
    TransportError,
)

connect = make_client

__all__ = [
    "RemoteTeacher", "RemoteTeacherConfig", "Handle", "make_client", "connect", "ServerInfo", "TransportError",
    "TeacherUnavailableError", "TeacherTimeoutError", "IncompatibleTeacherError", "RequestRejectedError",
    "ProtocolError",
]
