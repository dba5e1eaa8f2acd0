"""KV handoff across hosts, GPU to GPU: torch.distributed point-to-point between two ranks of a group.

The handle names the sender's rank and a tag. The receiver pulls: it asks the
sender through the group's key-value store (the one its ranks met through),
the sender's serving thread answers there (`ok`, `gone`, or a size mismatch)
and, on `ok`, sends the bytes with `send`/`recv`. Control never travels
as a collective or a speculative `recv`, because NCCL has no receive from any
rank and runs the operations between two ranks in the order they were posted;
for the same reason a receiver pulls from one sender one transfer at a time.

The store protocol, under the transport's key prefix:

    <sender>/requests      counter; a receiver takes the next number n with ADD
    <sender>/request/<n>   msgpack NcclPull, read and deleted by the sender in order
    <sender>/reply/<n>     the answer; a receiver that gives up first writes
                           `abandoned` there instead (compare-and-set, so exactly
                           one of them wins) and nothing is sent

A store client runs one operation at a time and a `wait` holds it, so the
serving thread and each peer's pulls talk to the store over connections of
their own (`Store.clone`).

The same code runs on NCCL across GPUs and on gloo on CPU (the tests): NCCL
refuses two ranks on one GPU. Its limits: a sender blocks in `send` until the
receiver takes the data, so a receiver that dies between its request and its
`recv` holds the sender's serving thread until the group's timeout.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import msgspec
import torch
import torch.distributed as dist

from tropical.kv.base import (
    BadHandle,
    FetchTimeout,
    KvGone,
    LayoutMismatch,
    TransferRecord,
    Transport,
    as_bytes,
    from_bytes,
    layout_nbytes,
)
from tropical.protocol import KvLayout, KvTransport

log = logging.getLogger(__name__)

OK: Final = b"ok"
GONE: Final = b"gone"
MISMATCH: Final = b"mismatch:"  # followed by the bytes the sender holds
ABANDONED: Final = b"abandoned"
STOP: Final = b"stop"  # a request only the transport's own close sends
IDLE_WAIT: Final = timedelta(hours=1)  # the serving thread's wait for the next request; a timeout just waits again
STOP_WAIT_S: Final = 10.0
MAX_TAG: Final = (1 << 31) - 1


class NcclHandle(msgspec.Struct, frozen=True, kw_only=True):
    """Which rank holds the KV, under which tag; `epoch` tells one life of that rank's transport from another."""

    rank: int
    epoch: int
    tag: int


class NcclPull(msgspec.Struct, frozen=True, kw_only=True):
    handle: bytes
    receiver: int
    nbytes: int


class NcclTransport(Transport[torch.Tensor]):
    """One per process of the group; it serves its own leases from a thread and pulls from other ranks.

    `store` is the group's key-value store (e.g. the TCPStore it was made
    with); `device` is where the group's backend takes tensors: a CUDA device
    for NCCL, the CPU for gloo.
    """

    kind = KvTransport.NCCL

    def __init__(
        self,
        store: dist.Store,
        *,
        group: dist.ProcessGroup | None = None,
        prefix: str = "tropical:kv",
        device: str | torch.device = "cpu",
        clock: Callable[[], float] = time.time,
        on_transfer: Callable[[TransferRecord], None] | None = None,
    ) -> None:
        super().__init__(clock=clock, on_transfer=on_transfer)
        self.device = torch.device(device)
        self._group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self._group)
        self.world_size = dist.get_world_size(self._group)
        self._store = dist.PrefixStore(prefix, store).clone()  # ours alone: a caller's long wait cannot hold it
        self._epoch = secrets.randbits(62)
        self._next_tag = 0
        self._peers: dict[int, tuple[threading.Lock, dist.Store]] = {}
        first = int(self._store.add(_counter(self.rank), 0)) + 1  # requests to an earlier life of this rank are not ours
        self._server = threading.Thread(
            target=self._serve, args=(self._store.clone(), first), name=f"kv-nccl-rank{self.rank}", daemon=True
        )
        self._server.start()

    # --- the sender's side
    async def _put(self, data: torch.Tensor, lease_s: float) -> tuple[bytes, torch.Tensor]:
        data = data.detach().to(self.device).contiguous()
        self._next_tag = self._next_tag % MAX_TAG + 1
        handle = msgspec.msgpack.encode(NcclHandle(rank=self.rank, epoch=self._epoch, tag=self._next_tag))
        return handle, data

    async def _free(self, handle: bytes, resource: torch.Tensor) -> None:
        """Dropping the reference is enough: a send in progress holds its own."""

    def _serve(self, store: dist.Store, number: int) -> None:
        """Answer pulls in the order receivers numbered them, until close sends STOP."""
        self._use_device()
        while True:
            key = _request(self.rank, number)
            try:
                store.wait([key], IDLE_WAIT)
                payload = store.get(key)
                store.delete_key(key)
            except Exception as exc:
                if isinstance(exc, dist.DistStoreError) and "timeout" in str(exc):
                    continue  # idle for a long while: wait again
                log.exception("the KV serving thread of rank %d lost its store; it stops", self.rank)
                return
            if payload == STOP:
                return
            try:
                self._answer(store, number, msgspec.msgpack.decode(payload, type=NcclPull))
            except Exception:
                log.exception("rank %d could not answer KV pull %d", self.rank, number)
            number += 1

    def _answer(self, store: dist.Store, number: int, pull: NcclPull) -> None:
        data = self._leased(pull.handle)
        if data is None:
            status = GONE
        elif data.numel() * data.element_size() != pull.nbytes:
            status = MISMATCH + str(data.numel() * data.element_size()).encode()
        else:
            status = OK
        reply = _reply(self.rank, number)
        if store.compare_set(reply, "", status) != status:  # the receiver gave up first
            store.delete_key(reply)
            return
        if data is not None and status == OK:
            tag = msgspec.msgpack.decode(pull.handle, type=NcclHandle).tag
            dist.send(as_bytes(data), group=self._group, group_dst=pull.receiver, tag=tag)

    # --- the receiver's side
    async def _get(self, handle: bytes, layout: KvLayout, deadline: float) -> torch.Tensor:
        try:
            where = msgspec.msgpack.decode(handle, type=NcclHandle)
        except msgspec.DecodeError as exc:
            raise BadHandle(f"not an NCCL KV handle: {exc}") from None
        if not 0 <= where.rank < self.world_size:
            raise BadHandle(f"the handle names rank {where.rank}; the group has ranks 0 to {self.world_size - 1}")
        if where.rank == self.rank:
            raise BadHandle(f"the handle names this rank ({self.rank}): sender and receiver must be two ranks")
        if where.rank not in self._peers:
            self._peers[where.rank] = (threading.Lock(), self._store.clone())
        raw = await asyncio.to_thread(self._pull, where, handle, layout_nbytes(layout), deadline)
        return from_bytes(raw, layout)

    def _pull(self, where: NcclHandle, handle: bytes, nbytes: int, deadline: float) -> torch.Tensor:
        self._use_device()
        lock, store = self._peers[where.rank]
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise FetchTimeout(f"another pull from rank {where.rank} is still running")
        try:
            number = int(store.add(_counter(where.rank), 1))
            pull = NcclPull(handle=handle, receiver=self.rank, nbytes=nbytes)
            store.set(_request(where.rank, number), msgspec.msgpack.encode(pull))
            reply = _reply(where.rank, number)
            remaining = deadline - time.monotonic()
            if remaining > 0:
                try:
                    store.wait([reply], timedelta(seconds=remaining))
                except dist.DistStoreError:
                    pass  # settled below: either the answer came after all, or the pull is abandoned
            status = store.compare_set(reply, "", ABANDONED)
            if status == ABANDONED:
                raise FetchTimeout(f"rank {where.rank} did not answer in time")
            store.delete_key(reply)
            if status == GONE:
                raise KvGone(f"rank {where.rank} no longer holds this KV (released or expired)")
            if status.startswith(MISMATCH):
                held = status[len(MISMATCH) :].decode()
                raise LayoutMismatch(f"rank {where.rank} holds {held} bytes, the layout says {nbytes}")
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            dist.recv(buffer, group=self._group, group_src=where.rank, tag=where.tag)
            return buffer
        finally:
            lock.release()

    def _use_device(self) -> None:
        """A thread starts on CUDA device 0; NCCL must run on the transport's device."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    # --- lifecycle
    @property
    def serving(self) -> bool:
        """Whether this rank still answers pulls (until `close`)."""
        return self._server.is_alive()

    async def _close(self) -> None:
        """Stop the serving thread behind any pulls already asked for (they are answered `gone`)."""
        if not self._server.is_alive():
            return
        number = int(self._store.add(_counter(self.rank), 1))
        self._store.set(_request(self.rank, number), STOP)
        await asyncio.to_thread(self._server.join, STOP_WAIT_S)
        if self._server.is_alive():
            log.warning("the KV serving thread of rank %d is still sending; it ends with the process", self.rank)


def _counter(rank: int) -> str:
    return f"{rank}/requests"


def _request(rank: int, number: int) -> str:
    return f"{rank}/request/{number}"


def _reply(rank: int, number: int) -> str:
    return f"{rank}/reply/{number}"


GROUP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")  # as torchrun sets them


@dataclass(frozen=True)
class GroupAddress:
    """Where a worker meets the others of its KV group: rank 0 hosts the group's store at `host:port`."""

    host: str
    port: int
    rank: int
    world_size: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GroupAddress:
        """The group as `torchrun` describes it; ValueError naming what is missing or wrong."""
        missing = [name for name in GROUP_VARIABLES if not environ.get(name)]
        if missing:
            raise ValueError(f"the NCCL KV transport joins a process group: set {', '.join(missing)} (as torchrun does)")
        try:
            address = cls(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), int(environ["RANK"]), int(environ["WORLD_SIZE"]))
        except ValueError:
            raise ValueError("MASTER_PORT, RANK and WORLD_SIZE must be integers") from None
        if not (0 < address.port < 65536 and 0 <= address.rank < address.world_size):
            raise ValueError(f"no rank {address.rank} in a group of {address.world_size} on port {address.port}")
        return address


def join_group(address: GroupAddress, *, timeout_s: float = 300.0) -> tuple[dist.Store, torch.device]:
    """Join the workers' process group (NCCL where there is a GPU, gloo otherwise; blocks until every rank is there).

    Returns the group's store, which `NcclTransport` talks through, and the
    device its transfers use. Leave with `dist.destroy_process_group()`.
    """
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address.host, address.port, address.world_size, is_master=address.rank == 0, timeout=timeout, wait_for_workers=False)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore("group", store), rank=address.rank, world_size=address.world_size, timeout=timeout)
    return store, device
