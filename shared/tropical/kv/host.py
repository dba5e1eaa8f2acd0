"""KV handoff between processes of one host, through POSIX shared memory.

The handle is the segment's name. The sender creates the segment, owns it and
unlinks it when the lease ends; a receiver reads it into memory of its own.
A reader that opened the segment before the unlink still reads it whole, so a
cancel racing a fetch cannot tear the data.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory

import torch

from tropical.kv import shm
from tropical.kv.base import TransferRecord, Transport, from_bytes, layout_nbytes, off_loop
from tropical.protocol import KvLayout, KvTransport


class HostTransport(Transport[SharedMemory]):
    """`device` is where fetched KV is put (the receiving engine's device)."""

    kind = KvTransport.HOST

    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        clock: Callable[[], float] = time.time,
        on_transfer: Callable[[TransferRecord], None] | None = None,
    ) -> None:
        super().__init__(clock=clock, on_transfer=on_transfer)
        self.device = torch.device(device)

    async def _put(self, data: torch.Tensor, lease_s: float) -> tuple[bytes, SharedMemory]:
        creating = asyncio.ensure_future(off_loop(data.numel() * data.element_size(), lambda: shm.create(data)))
        try:
            segment = await asyncio.shield(creating)
        except asyncio.CancelledError:
            creating.add_done_callback(_remove_orphan)  # the copy finishes in its thread: unlink what it made
            raise
        return segment.name.encode("ascii"), segment

    async def _free(self, handle: bytes, resource: SharedMemory) -> None:
        shm.remove(resource)

    async def _get(self, handle: bytes, layout: KvLayout, deadline: float) -> torch.Tensor:
        name = shm.check_name(handle)
        nbytes = layout_nbytes(layout)
        raw = await off_loop(nbytes, lambda: shm.read(name, nbytes))
        data = from_bytes(raw, layout)
        if self.device.type == "cpu":
            return data
        return await asyncio.to_thread(data.to, self.device)


def _remove_orphan(creating: asyncio.Future[SharedMemory]) -> None:
    if not creating.cancelled() and creating.exception() is None:
        shm.remove(creating.result())
