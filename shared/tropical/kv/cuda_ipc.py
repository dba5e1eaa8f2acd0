"""KV handoff between processes on one host's GPUs, through CUDA IPC: no copy through the host.

The sender keeps the exported tensor on its GPU and hands out an IPC handle to
it; the receiver maps the tensor and copies it into memory of its own. CUDA
cannot tell a receiver that the sender let go of the memory, so each lease also
holds a one-byte shared-memory marker, unlinked when the lease ends: a receiver
that finds no marker gets KvGone instead of reading freed memory. A lease that
ends while a receiver copies is safe: PyTorch's IPC reference count keeps the
memory until the receiver drops its mapping.

CUDA IPC cannot map memory into the process that shared it, so sender and
receiver are always two processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory

import msgspec
import torch

from tropical.engine.kv_transfer import CudaIpcHandle, open_cuda, share_cuda
from tropical.kv import shm
from tropical.kv.base import BadHandle, KvGone, TransferRecord, Transport
from tropical.protocol import KvLayout, KvTransport


class CudaIpcLease(msgspec.Struct, frozen=True, kw_only=True):
    """The handle: the tensor's IPC handle and the marker that says the lease is still on."""

    marker: str
    tensor: CudaIpcHandle


class CudaIpcTransport(Transport[tuple[torch.Tensor, SharedMemory]]):
    """`device` is the CUDA device fetched KV is copied to."""

    kind = KvTransport.CUDA_IPC

    def __init__(
        self,
        *,
        device: str | torch.device = "cuda",
        clock: Callable[[], float] = time.time,
        on_transfer: Callable[[TransferRecord], None] | None = None,
    ) -> None:
        super().__init__(clock=clock, on_transfer=on_transfer)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA IPC needs a CUDA device, not {self.device}")

    async def _put(self, data: torch.Tensor, lease_s: float) -> tuple[bytes, tuple[torch.Tensor, SharedMemory]]:
        if data.device.type != "cuda":
            raise ValueError("CUDA IPC shares GPU memory: export the KV with to_host=False")
        data = data.detach().contiguous()
        shared = share_cuda(data)
        marker = shm.create(torch.zeros(1, dtype=torch.uint8))
        handle = msgspec.msgpack.encode(CudaIpcLease(marker=marker.name, tensor=shared))
        return handle, (data, marker)

    async def _free(self, handle: bytes, resource: tuple[torch.Tensor, SharedMemory]) -> None:
        shm.remove(resource[1])

    async def _get(self, handle: bytes, layout: KvLayout, deadline: float) -> torch.Tensor:
        try:
            lease = msgspec.msgpack.decode(handle, type=CudaIpcLease)
        except msgspec.DecodeError as exc:
            raise BadHandle(f"not a CUDA IPC KV handle: {exc}") from None
        shm.check_name(lease.marker.encode())
        if not shm.exists(lease.marker):
            raise KvGone(f"the CUDA IPC lease {lease.marker} has ended (released or expired)")
        return await asyncio.to_thread(self._copy, lease.tensor)

    def _copy(self, handle: CudaIpcHandle) -> torch.Tensor:
        source = open_cuda(handle)
        try:
            copy = torch.empty(source.shape, dtype=source.dtype, device=self.device)
            copy.copy_(source)
            torch.cuda.synchronize(self.device)
            return copy
        finally:
            del source
