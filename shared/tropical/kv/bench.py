"""Bandwidth of a KV handoff between two processes, through the transport the live services use, against a local copy.

    tropical bench-kv --transport cuda_ipc --json kv.json

This process exports KV of each size and offers it; a receiver process of its
own fetches it through the same transport kind, as a multiplexing worker does,
and reports the fetch's transfer record. The ceiling is the same bytes copied
within one process on the same device. Sizes are in tokens of Llama-3-8B's KV
geometry (32 layers, 8 KV heads of 128; 128 KiB a token in bf16).

Messages between the two processes are msgpack over a pipe, nothing pickled.
"""

from __future__ import annotations

import asyncio
import datetime
import multiprocessing
import statistics
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any, Final

import msgspec
import torch

from tropical.engine.kv_transfer import KvExport
from tropical.engine.roofline import copy_seconds
from tropical.kv import make_transport
from tropical.kv.base import TransferRecord
from tropical.protocol import KvLayout, KvTransport, SamplingParams

LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128
WAIT: Final = 120.0  # seconds one fetch may take, the receiver's CUDA start included
STOP: Final = b""


class Pull(msgspec.Struct, frozen=True):
    handle: bytes
    layout: KvLayout


class Pulled(msgspec.Struct, frozen=True):
    nbytes: int = 0
    seconds: float = 0.0
    error: str = ""


def _next(connection: Connection) -> bytes:
    """The next message, within WAIT seconds (a blocking read, for a thread)."""
    if not connection.poll(WAIT):
        raise TimeoutError(f"no message from the other process in {WAIT:.0f} s")
    return connection.recv_bytes()


def _receive(connection: Connection, kind: str, device: str) -> None:
    """The receiving process: fetch each handle it is sent, answer with the fetch's record."""
    asyncio.run(_serve(connection, kind, device))


async def _serve(connection: Connection, kind: str, device: str) -> None:
    records: list[TransferRecord] = []
    async with make_transport(kind, device=device, on_transfer=records.append) as transport:
        while (raw := await asyncio.to_thread(_next, connection)) != STOP:
            pull = msgspec.msgpack.decode(raw, type=Pull)
            try:
                await transport.fetch(pull.handle, pull.layout, timeout_s=WAIT)  # the copy is dropped at once
                record = records[-1]
                reply = Pulled(nbytes=record.nbytes, seconds=record.duration_s)
            except Exception as exc:  # reported to the sender, which fails the run with it
                reply = Pulled(error=f"{type(exc).__name__}: {exc}")
            connection.send_bytes(msgspec.msgpack.encode(reply))


def _export(tokens: int, dtype: torch.dtype, device: torch.device) -> KvExport:
    data = torch.randn(2, LAYERS, tokens, KV_HEADS, HEAD_DIM, device=device).to(dtype)
    return KvExport("bench", list(range(tokens)), [], SamplingParams(), 1, 16, data)


def run_kv_benchmark(kind: str = "cuda_ipc", tokens: Sequence[int] = (1024, 8192), repeats: int = 3) -> dict[str, Any]:
    """Fetch bandwidth of each size through `kind` (best and median of `repeats`), and a local copy's, side by side."""
    transport_kind = KvTransport(kind)
    device = torch.device("cuda" if transport_kind is KvTransport.CUDA_IPC else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    receiver = context.Process(target=_receive, args=(theirs, kind, str(device)), name="kv-bench-receiver")
    receiver.start()
    rows = []

    async def measure() -> None:
        async with make_transport(kind, device=str(device)) as transport:
            for count in tokens:
                kv = _export(count, dtype, device)
                fetches, copies = [], []
                for _ in range(repeats + 1):  # the first maps the sender's memory for the first time: not counted
                    offer = await transport.offer(kv, lease_s=WAIT)
                    ours.send_bytes(msgspec.msgpack.encode(Pull(offer.handle, offer.layout)))
                    reply = msgspec.msgpack.decode(await asyncio.to_thread(_next, ours), type=Pulled)
                    await transport.release(offer.handle)
                    if reply.error:
                        raise RuntimeError(f"the receiver could not fetch {count} tokens: {reply.error}")
                    fetches.append(reply.nbytes / reply.seconds)
                    copies.append(kv.nbytes / copy_seconds(kv.data))  # the ceiling: the same bytes copied within this process
                fetches, copies = fetches[1:], copies[1:]
                rows.append({
                    "tokens": count, "nbytes": kv.nbytes,
                    "fetch_bytes_per_s": max(fetches), "fetch_median_bytes_per_s": statistics.median(fetches),
                    "copy_bytes_per_s": max(copies), "fetch_over_copy": max(fetches) / max(copies),
                })  # fmt: skip

    try:
        asyncio.run(measure())
    finally:
        ours.send_bytes(STOP)
        receiver.join(timeout=WAIT)
        if receiver.is_alive():
            receiver.kill()
            receiver.join(timeout=WAIT)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "transport": transport_kind.value,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "sizes": rows,
    }
