"""Message buffers that the transports reuse instead of allocating one per message."""

from __future__ import annotations

import collections

import torch


class HostBuffers:
    """Reused host buffers for messages (CPU only: there, a fresh 2 MB buffer a message costs page faults; on
    the GPU the caching allocator already reuses memory, with stream safety). A buffer comes back by `give()`
    once no operation uses it; it is handed out again only when no tensor but ours views its storage (a
    payload that a student still holds keeps its buffer)."""

    _KEEP = 16

    def __init__(self, device: torch.device):
        self.device = device
        self.reuse = device.type == "cpu" and _storage_use_count is not None
        self.free: dict = collections.defaultdict(list)

    def take(self, nbytes: int) -> torch.Tensor:
        for i, buf in enumerate(self.free.get(nbytes, ())):
            if _storage_use_count(buf.untyped_storage()._cdata) == _UNSHARED:
                return self.free[nbytes].pop(i)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def give(self, buf: torch.Tensor) -> None:
        if self.reuse and len(self.free[buf.numel()]) < self._KEEP:
            self.free[buf.numel()].append(buf)


def _unshared_use_count():
    """The use count of a storage that one tensor holds, as seen through a storage object of its own (2 in the
    torch versions we know; measured, not assumed)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None, None
    one = torch.empty(1)
    return count, count(one.untyped_storage()._cdata)


_storage_use_count, _UNSHARED = _unshared_use_count()
