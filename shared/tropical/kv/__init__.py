"""KV handoff, prefill to decode: one interface, four transports, one conformance suite.

    sender = make_transport("host")
    offer = await sender.offer(engine.export_kv(request_id), lease_s=30.0)
    # ... offer.handle, offer.layout, offer.nbytes, offer.lease_expires_at go out in a KvHandoff
    data = await receiver.fetch(handoff.handle, handoff.layout, timeout_s=5.0)
    # ... the receiver imports the KV and acks; the sender then calls
    await sender.release(offer.handle)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tropical.kv.base import (
    BadHandle,
    FetchTimeout,
    KvError,
    KvGone,
    KvOffer,
    LayoutMismatch,
    TransferRecord,
    Transport,
    TransportClosed,
)
from tropical.kv.cuda_ipc import CudaIpcTransport
from tropical.kv.host import HostTransport
from tropical.kv.nccl import NcclTransport
from tropical.kv.redis import RedisTransport
from tropical.protocol import KvTransport

__all__ = [
    "BadHandle",
    "CudaIpcTransport",
    "FetchTimeout",
    "HostTransport",
    "KvError",
    "KvGone",
    "KvOffer",
    "LayoutMismatch",
    "NcclTransport",
    "RedisTransport",
    "TransferRecord",
    "Transport",
    "TransportClosed",
    "make_transport",
]


def make_transport(
    kind: KvTransport | str,
    *,
    device: str | torch.device = "cpu",
    clock: Callable[[], float] = time.time,
    on_transfer: Callable[[TransferRecord], None] | None = None,
    redis_url: str | None = None,
    prefix: str = "tropical",
    store: dist.Store | None = None,
    group: dist.ProcessGroup | None = None,
) -> Transport[Any]:
    """The transport of that kind; `redis_url` is for Redis, `store` and `group` for NCCL.

    `prefix` is the deployment's namespace: Redis keys and NCCL store keys live under `<prefix>:kv`.
    """
    kind = KvTransport(kind)
    if kind is KvTransport.HOST:
        return HostTransport(device=device, clock=clock, on_transfer=on_transfer)
    if kind is KvTransport.REDIS:
        if redis_url is None:
            raise ValueError("the Redis KV transport needs redis_url")
        return RedisTransport.from_url(redis_url, prefix=prefix, device=device, clock=clock, on_transfer=on_transfer)
    if kind is KvTransport.CUDA_IPC:
        return CudaIpcTransport(device=device, clock=clock, on_transfer=on_transfer)
    if store is None:
        raise ValueError("the NCCL KV transport needs the process group's store")
    return NcclTransport(store, group=group, prefix=f"{prefix}:kv", device=device, clock=clock, on_transfer=on_transfer)
