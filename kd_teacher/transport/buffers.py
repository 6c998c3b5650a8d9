"""Message buffers that the transports reuse instead of allocating one per message.

Ownership is explicit: `take()` lends a buffer, and the buffer comes back to the pool by itself when the last
tensor that views it is gone (the payload a student holds, a send still in flight, a view handed to the
engine). Nobody gives a buffer back by hand, so nobody can give back one that is still in use.

How: a lent buffer is a tensor made with `torch.from_numpy` of a fresh numpy view of a pooled array. Every
tensor made from it (slices, `.view(dtype)`, the payload's values / indices / lse) shares one storage, and that
storage holds the numpy view; when the storage is freed, the view is, and a `weakref.finalize` on the view
puts the pooled array back. Public torch and numpy behaviour only (the earlier version read a private storage
use count).
"""

from __future__ import annotations

import collections
import threading
import weakref

import numpy as np
import torch


class HostBuffers:
    """Reused uint8 host buffers (CPU only: there, a fresh 2 MB buffer a message costs page faults; on the GPU
    the caching allocator already reuses memory, with stream safety, so `take` allocates)."""

    _KEEP = 16  # free buffers kept per size

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.reuse = self.device.type == "cpu"
        self._free: dict = collections.defaultdict(list)
        self._lock = threading.Lock()  # buffers come back on whichever thread drops the last view
        self.allocated = 0  # arrays made so far (tests and benchmarks read it)

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` that no one else uses until every tensor viewing it is gone."""
        if not self.reuse:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with self._lock:
            free = self._free.get(nbytes)
            array = free.pop() if free else None
        if array is None:
            array = np.empty(nbytes, dtype=np.uint8)
            self.allocated += 1
        lent = array.view()  # its own object: freed together with the storage of the tensor below
        weakref.finalize(lent, self._give_back, array)
        return torch.from_numpy(lent)

    def _give_back(self, array: np.ndarray) -> None:
        with self._lock:
            kept = self._free[array.nbytes]
            if len(kept) < self._KEEP:
                kept.append(array)
