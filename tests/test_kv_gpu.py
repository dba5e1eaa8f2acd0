"""KV handoff on a GPU host: CUDA IPC between two processes, and the host path delivering onto the GPU.

Skipped where there is no CUDA GPU. The receiver is a process of its own (CUDA
IPC cannot map memory into the process that shared it); it takes handles and
answers with the bytes it fetched through a key-value store, so nothing is
pickled between the processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Final

import msgspec
import pytest
import torch
import torch.distributed as dist

from tropical.engine import Engine, EngineConfig, FakeClock, KvExport, ModelConfig, kv_from_bytes, kv_to_bytes
from tropical.kv import CudaIpcTransport, HostTransport, KvError, TransferRecord
from tropical.kv.bench import run_kv_benchmark
from tropical.kv.cuda_ipc import CudaIpcLease
from tropical.protocol import KvLayout, KvTransport, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WAIT: Final = 60.0  # seconds one fetch may take, the receiver's start (CUDA context) included
LEASE: Final = 30.0
T0: Final = 1_000.0
GREEDY = SamplingParams(ignore_eos=True)
SMALL = ModelConfig.tiny(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_position=512
)
STOP: Final = b"stop"


class Pull(msgspec.Struct, frozen=True):
    handle: bytes
    layout: KvLayout


class Fetched(msgspec.Struct, frozen=True):
    data: bytes = b""
    device: str = ""
    error: str = ""  # "<error class>: <message>" when the fetch failed


def receive(port: int) -> None:
    """The receiving worker's process: fetch each handle it is given, answer with the bytes or the error."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=WAIT))
    asyncio.run(serve_pulls(store))


async def serve_pulls(store: dist.Store) -> None:
    async with CudaIpcTransport(device="cuda") as transport:
        number = 1
        while (raw := wait_and_get(store, f"pull/{number}")) != STOP:
            pull = msgspec.msgpack.decode(raw, type=Pull)
            try:
                data = await transport.fetch(pull.handle, pull.layout, timeout_s=WAIT)
                reply = Fetched(data=kv_to_bytes(data), device=str(data.device))
            except KvError as exc:
                reply = Fetched(error=f"{type(exc).__name__}: {exc}")
            store.set(f"fetched/{number}", msgspec.msgpack.encode(reply))
            number += 1


def wait_and_get(store: dist.Store, key: str) -> bytes:
    store.wait([key], timedelta(seconds=WAIT))
    return store.get(key)


class Receiver:
    """The test's end of the receiving process."""

    def __init__(self, store: dist.Store) -> None:
        self.store = store
        self.number = 0

    async def pull(self, handle: bytes, layout: KvLayout) -> Fetched:
        self.number += 1
        self.store.set(f"pull/{self.number}", msgspec.msgpack.encode(Pull(handle, layout)))
        raw = await asyncio.to_thread(wait_and_get, self.store, f"fetched/{self.number}")
        return msgspec.msgpack.decode(raw, type=Fetched)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=WAIT))
    process = multiprocessing.get_context("spawn").Process(target=receive, args=(store.port,), name="kv-receiver")
    process.start()
    opened = Receiver(store)
    try:
        yield opened
    finally:
        store.set(f"pull/{opened.number + 1}", STOP)
        process.join(timeout=WAIT)
        if process.is_alive():
            process.kill()
            process.join(timeout=WAIT)


@dataclass
class Sender:
    transport: CudaIpcTransport
    clock: FakeClock
    records: list[TransferRecord]


@pytest.fixture
async def sender() -> AsyncIterator[Sender]:
    clock = FakeClock(T0)
    records: list[TransferRecord] = []
    transport = CudaIpcTransport(device="cuda", clock=clock.now, on_transfer=records.append)
    try:
        yield Sender(transport, clock, records)
    finally:
        await transport.close()


def cuda_engine(block_size: int = 8) -> Engine:
    return Engine.load("tiny", EngineConfig(device="cuda", block_size=block_size, num_kv_blocks=64), tiny=SMALL)


def decode_all(engine: Engine) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [token for out in engine.step().outputs for token in out.new_token_ids]
    return tokens


def random_kv(tokens: int, seed: int, device: str = "cuda") -> KvExport:
    data = torch.randn((2, 2, tokens, 2, 16), generator=torch.Generator().manual_seed(seed)).to(device)
    return KvExport(f"r{seed}", list(range(tokens)), [], GREEDY, tokens + 1, 16, data)


def fetched_tensor(fetched: Fetched, layout: KvLayout) -> torch.Tensor:
    assert not fetched.error, fetched.error
    assert fetched.device.startswith("cuda"), f"fetched onto {fetched.device}"
    return kv_from_bytes(layout, fetched.data)


async def test_an_engine_export_crosses_processes_over_cuda_ipc(receiver: Receiver, sender: Sender) -> None:
    transport, records = sender.transport, sender.records
    prompt = [(41 * i) % 500 for i in range(45)]
    local = cuda_engine()
    local.add_request("r", prompt, GREEDY, max_tokens=10)
    expected = decode_all(local)

    engine = cuda_engine()
    engine.add_request("r", prompt, GREEDY, max_tokens=1, retain_kv=True)
    first = engine.step().outputs[0].new_token_ids
    export = engine.export_kv("r", to_host=False)  # stays on the GPU
    offer = await transport.offer(export, lease_s=LEASE)
    engine.abort("r")
    data = fetched_tensor(await receiver.pull(offer.handle, offer.layout), offer.layout)
    assert torch.equal(data, export.data.cpu())

    decoder = cuda_engine(block_size=4)
    decoder.import_kv(replace(export, data=data.cuda(), max_tokens=10))
    assert first + decode_all(decoder) == expected
    assert await transport.release(offer.handle)
    assert [(r.transport, r.direction, r.nbytes) for r in records] == [(KvTransport.CUDA_IPC, "offer", export.nbytes)]


async def test_offers_at_once_of_any_size_do_not_mix(receiver: Receiver, sender: Sender) -> None:
    transport = sender.transport
    kvs = [random_kv(tokens, seed) for seed, tokens in enumerate((1, 3000, 7))]
    offers = await asyncio.gather(*(transport.offer(kv, lease_s=LEASE) for kv in kvs))
    for kv, offer in reversed(list(zip(kvs, offers))):
        assert torch.equal(fetched_tensor(await receiver.pull(offer.handle, offer.layout), offer.layout), kv.data.cpu())


async def test_a_released_or_expired_lease_is_gone(receiver: Receiver, sender: Sender) -> None:
    transport, clock = sender.transport, sender.clock
    released = await transport.offer(random_kv(4, 1), lease_s=LEASE)
    expiring = await transport.offer(random_kv(4, 2), lease_s=5.0)
    assert await transport.release(released.handle)
    clock.sleep_until(T0 + 5.0)
    assert await transport.expire() == [expiring.handle]
    for offer in (released, expiring):
        assert (await receiver.pull(offer.handle, offer.layout)).error.startswith("KvGone")


async def test_bad_handles_are_refused(receiver: Receiver, sender: Sender) -> None:
    transport = sender.transport
    offer = await transport.offer(random_kv(2, 3), lease_s=LEASE)
    lease = msgspec.msgpack.decode(offer.handle, type=CudaIpcLease)
    foreign = msgspec.msgpack.encode(msgspec.structs.replace(lease, marker="/etc/passwd"))
    for garbage in (b"", b"\xff\x00nonsense", foreign):
        assert (await receiver.pull(garbage, offer.layout)).error.startswith("BadHandle")
    wrong = msgspec.structs.replace(offer.layout, num_tokens=3)
    assert (await receiver.pull(offer.handle, wrong)).error.startswith("LayoutMismatch")


async def test_cuda_ipc_shares_only_gpu_memory(sender: Sender) -> None:
    transport = sender.transport
    with pytest.raises(ValueError, match="to_host=False"):
        await transport.offer(random_kv(2, 4, device="cpu"), lease_s=LEASE)
    with pytest.raises(ValueError, match="CUDA device"):
        CudaIpcTransport(device="cpu")


async def test_the_host_path_delivers_onto_the_gpu() -> None:
    kv = random_kv(300, 5, device="cpu")
    async with HostTransport() as sending, HostTransport(device="cuda") as receiving:
        offer = await sending.offer(kv, lease_s=LEASE)
        data = await receiving.fetch(offer.handle, offer.layout, timeout_s=WAIT)
    assert data.is_cuda and torch.equal(data.cpu(), kv.data)


def test_the_handoff_benchmark_fetches_over_cuda_ipc() -> None:
    report = run_kv_benchmark("cuda_ipc", tokens=(64,), repeats=1)
    (row,) = report["sizes"]
    assert report["dtype"] == "bfloat16" and row["nbytes"] == 64 * 128 * 1024
    assert row["fetch_bytes_per_s"] > 0 and row["copy_bytes_per_s"] > 0
