"""Run real Megatron-Core models on a CPU (gloo), for tests, CI and the CPU demo.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the math: it asks
`torch.cuda.current_device()` where to put buffers, creates a few `device="cuda"` scalars in the pipeline
schedules, calls `torch.cuda.synchronize()` around p2p and checkpoint writes, and keeps its RNG tracker's
states in CUDA generators. Its MoE all-to-all token dispatcher copies routing counts to the host on a side
CUDA stream (numpy arrays there; on a CPU they stay tensors, which torch's `all_to_all_single` refuses as split
sizes). `enable_megatron_on_cpu()` bridges exactly those places and nothing else, so the modules, kernels
(torch's CPU ones) and parallel layout under test are Megatron-Core's own.

It is a no-op when CUDA is available: on a GPU nothing here is ever used.
"""

from __future__ import annotations

import importlib
import time
import types

import torch

_ENABLED = False

# Megatron-Core modules that create tensors with a literal device="cuda".
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # Megatron's optimizer, gradient clipping and grad buffers (training loops: the hook's example and tests)
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)


def _cpu_device(device):
    """Map any CUDA device spelling to the CPU; leave everything else as it is."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _remap_factory(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapped


class _TorchWithCpuCuda(types.ModuleType):
    """Stands in for `torch` inside the few Megatron modules that hard-code device="cuda"."""

    _factories = ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "ones_like")

    def __init__(self):
        super().__init__("torch")
        for name in self._factories:
            setattr(self, name, _remap_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


class _CpuGenerator:
    """The CUDA generator the RNG tracker expects, kept as a dedicated CPU generator.

    A separate generator (not the default CPU one) keeps the tracker's fork() from perturbing the default
    CPU stream, which Megatron checks and warns about.
    """

    def __init__(self):
        self.gen = torch.Generator()

    def get_state(self, *args, **kwargs):
        return self.gen.get_state()

    def set_state(self, state, *args, **kwargs):
        self.gen.set_state(state)

    def manual_seed(self, seed, *args, **kwargs):
        self.gen.manual_seed(int(seed))


class _CpuEvent:
    """`torch.cuda.Event` as a host clock: Megatron-Core's static text-generation loop times every decode step
    with CUDA events (`tpot`), and the CPU build of torch has only a dummy Event class that refuses creation."""

    def __init__(self, enable_timing: bool = False, *args, **kwargs):
        self.time: float | None = None

    def record(self, *args, **kwargs) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, *args, **kwargs) -> None:
        pass

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return (end.time - self.time) * 1e3  # milliseconds, as CUDA events report


class _NoStream:
    """A CUDA stream on a machine without CUDA: work is already ordered, so waits do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, *args, **kwargs) -> _CpuEvent:
        event = _CpuEvent()
        event.record()
        return event

    def synchronize(self) -> None:
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, _NoStream)

    def __hash__(self) -> int:
        return 0


def _bridge_moe_dispatch() -> None:
    """The all-to-all MoE dispatcher's host copies (megatron.core.transformer.moe)."""
    import contextlib

    torch.cuda.Stream = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    try:
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
    except ImportError:
        return
    to_host = moe_utils.maybe_move_tensor_to_cpu

    def to_host_as_on_cuda(tensor, as_numpy: bool = False, record_stream: bool = False):
        # On CUDA the split sizes come back as numpy arrays; the CPU tensors must become the same.
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host_as_on_cuda
    # megatron-core 0.16 names TE's router GEMM in `moe_utils` only when Transformer Engine imports, and
    # tests it for None (a NameError without TE); 0.19 defines it as None then.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def enable_megatron_on_cpu() -> bool:
    """Install the bridges; returns True if they are active (no CUDA), False on a GPU machine."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.Event = _CpuEvent
    # Megatron's optimizer asserts `param.type() == 'torch.cuda.FloatTensor'`: report CPU tensors by their
    # CUDA type name (only the no-argument form, which is a query; conversions are untouched).
    _tensor_type = torch.Tensor.type

    def _type_as_cuda(self, *args, **kwargs):
        if args or kwargs:
            return _tensor_type(self, *args, **kwargs)
        name = _tensor_type(self)
        return name.replace("torch.", "torch.cuda.", 1) if not self.is_cuda else name

    torch.Tensor.type = _type_as_cuda

    gen = _CpuGenerator()
    torch.cuda.get_rng_state = gen.get_state
    torch.cuda.set_rng_state = gen.set_state
    torch.cuda.manual_seed = gen.manual_seed
    torch.cuda.manual_seed_all = gen.manual_seed

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, clone=False, **k: gen.get_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: gen.set_state(state)

    shim = _TorchWithCpuCuda()
    for name in _MODULES_WITH_CUDA_LITERALS:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # the module moved in another megatron-core version
            continue
        mod.torch = shim
    _bridge_moe_dispatch()
    _ENABLED = True
    return True

