"""Host synchronization detector for CPU tests: every op that would make the host wait for an accelerator.

On a GPU a training step is queued asynchronously; reading a device value on the host (`.item()`, `bool()`,
`int()`, `float()`, `.tolist()`, `.cpu()`), an op whose output size depends on the data (`nonzero`,
boolean-mask indexing, `masked_select`) and a copy of host data to the device (`torch.tensor(list)`) stall
that queue. On CPU none of them shows, so `no_host_sync()` makes each of them raise: the aten ops through a
dispatch mode (it sees them inside any library code as well), `Tensor.tolist` (which reads memory without
dispatching) by patching it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host must wait for, or whose output shape depends on device data.
_SYNCING = {
    aten._local_scalar_dense.default: "a device value read on the host (.item(), bool(), int(), float())",
    aten.is_nonzero.default: "bool() of a tensor",
    aten.nonzero.default: "nonzero (output size depends on the data)",
    aten.masked_select.default: "masked_select (output size depends on the data)",
    aten.lift_fresh.default: "a tensor built from host data (torch.tensor(...): a host-to-device copy on a GPU)",
}


class HostSyncError(AssertionError):
    pass


class _NoSync(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # An empty tensor from host data moves no bytes (PyTorch skips empty copies): transformers' KV cache
        # starts each layer with `torch.tensor([], device=...)`.
        empty_lift = func is aten.lift_fresh.default and args[0].numel() == 0
        if func in _SYNCING and not empty_lift:
            raise HostSyncError(f"host synchronization: {_SYNCING[func]} ({func})")
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                raise HostSyncError(f"host synchronization: boolean-mask indexing ({func})")
        device = kwargs.get("device")
        to_host = device is not None and torch.device(device).type == "cpu"
        if func is aten._to_copy.default and to_host and args[0].device.type != "cpu":
            raise HostSyncError("host synchronization: a device tensor copied to the host (.cpu())")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Inside: any host synchronization raises `HostSyncError`."""
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        raise HostSyncError("host synchronization: Tensor.tolist()")

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        with _NoSync():
            yield
    finally:
        torch.Tensor.tolist = original  # type: ignore[method-assign]
