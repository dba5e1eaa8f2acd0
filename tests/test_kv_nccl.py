"""The NCCL transport's code, run on CPU over gloo: two processes, rank 0 offers and rank 1 pulls.

NCCL refuses two ranks on one GPU, so the same point-to-point code is proved
here with gloo, and on NCCL where the machine has two GPUs. The two ranks run one script of scenarios once per module
(starting processes is the slow part); each scenario is a test of its own. The
ranks exchange handles through the key-value store they met through, and
report what failed there too: nothing is pickled between processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Final

import msgspec
import pytest
import torch
import torch.distributed as dist

from tropical.engine import Engine, EngineConfig, FakeClock, KvExport, ModelConfig, kv_from_bytes, kv_to_bytes
from tropical.kv import BadHandle, FetchTimeout, KvGone, LayoutMismatch, NcclTransport, TransferRecord
from tropical.kv.base import layout_nbytes
from tropical.kv.nccl import NcclHandle, NcclPull
from tropical.protocol import KvLayout, KvTransport, SamplingParams

WAIT: Final = 30.0  # seconds any one exchange between the ranks may take
PEEK_S: Final = 0.25  # how often a rank waiting for the other checks that the other has not failed
RUN_WAIT: Final = 100.0  # the whole script, both ranks
SENDER, RECEIVER = 0, 1
T0: Final = 1_000.0
LEASE: Final = 60.0
GREEDY = SamplingParams(ignore_eos=True)
SMALL = ModelConfig.tiny(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_position=512
)
PROMPT: Final = [(29 * i) % 500 for i in range(37)]
MAX_TOKENS: Final = 10


class Offered(msgspec.Struct, frozen=True):
    handle: bytes
    layout: KvLayout
    data: bytes = b""  # the sender's bytes, where the receiver compares them
    first_token: int = 0


class Rank:
    """One rank's side of the script: its transport, its fake lease clock and a mailbox to the other rank."""

    def __init__(self, rank: int, store: dist.Store, device: str) -> None:
        self.rank = rank
        self.clock = FakeClock(T0)
        self.records: list[TransferRecord] = []
        self.transport = NcclTransport(store, device=device, clock=self.clock.now, on_transfer=self.records.append)
        self.store = store.clone()  # the test's own connection: the transport's waits never hold it
        self.mailbox = dist.PrefixStore("mail", self.store)

        self.scenario = ""

    def post(self, key: str, value: object = b"") -> None:
        self.mailbox.set(key, value if isinstance(value, bytes) else msgspec.msgpack.encode(value))

    def take(self, key: str) -> bytes:
        """What the other rank posted; fails early if the other rank's half of this scenario failed."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                self.mailbox.wait([key], timedelta(seconds=PEEK_S))
                return self.mailbox.get(key)
            except dist.DistStoreError:
                if self.mailbox.check([f"failed/{self.scenario}"]):
                    raise AssertionError("the other rank failed this scenario first") from None
                if time.monotonic() > deadline:
                    raise

    def end_scenario(self, failed: bool) -> None:
        """Say how this half went and wait for the other half, so one failure cannot leak into the next scenario."""
        if failed:
            self.post(f"failed/{self.scenario}")
        self.post(f"ended/{self.scenario}/{self.rank}")
        self.mailbox.wait([f"ended/{self.scenario}/{1 - self.rank}"], timedelta(seconds=WAIT))

    def take_offers(self, key: str) -> list[Offered]:
        return msgspec.msgpack.decode(self.take(key), type=list[Offered])

    async def fetch(self, offered: Offered, layout: KvLayout | None = None) -> torch.Tensor:
        """Fetched onto the group's device, compared on the CPU."""
        data = await self.transport.fetch(offered.handle, layout or offered.layout, timeout_s=WAIT)
        assert data.device == self.transport.device
        return data.cpu()


def small_engine(block_size: int = 8) -> Engine:
    config = EngineConfig(device="cpu", dtype="float32", block_size=block_size, num_kv_blocks=64)
    return Engine.load("tiny", config, tiny=SMALL)


def decode_all(engine: Engine) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [token for out in engine.step().outputs for token in out.new_token_ids]
    return tokens


def random_kv(tokens: int, seed: int) -> KvExport:
    data = torch.randn((2, 2, tokens, 2, 16), generator=torch.Generator().manual_seed(seed))
    return KvExport(f"r{seed}", list(range(tokens)), [], GREEDY, tokens + 1, 16, data)


# --- the script: each scenario has the sender's half and the receiver's half -----------------


async def engine_sender(me: Rank) -> None:
    engine = small_engine()
    engine.add_request("r", PROMPT, GREEDY, max_tokens=1, retain_kv=True)
    first = engine.step().outputs[0].new_token_ids[0]
    export = engine.export_kv("r")
    offer = await me.transport.offer(export, lease_s=LEASE)
    assert (offer.layout, offer.nbytes, offer.lease_expires_at) == (export.layout, export.nbytes, T0 + LEASE)
    me.post("engine/offer", [Offered(offer.handle, offer.layout, kv_to_bytes(export.data), first)])
    me.take("engine/acked")
    assert await me.transport.release(offer.handle)
    me.post("engine/released")


async def engine_receiver(me: Rank) -> None:
    local = small_engine()
    local.add_request("r", PROMPT, GREEDY, max_tokens=MAX_TOKENS)
    expected = decode_all(local)
    (offered,) = me.take_offers("engine/offer")
    data = await me.fetch(offered)
    assert torch.equal(data, kv_from_bytes(offered.layout, offered.data))
    engine = small_engine(block_size=4)
    engine.import_kv(KvExport("r", PROMPT, [offered.first_token], GREEDY, MAX_TOKENS, 8, data))
    assert [offered.first_token] + decode_all(engine) == expected
    me.post("engine/acked")
    me.take("engine/released")
    with pytest.raises(KvGone, match="no longer holds"):
        await me.fetch(offered)


SIZES: Final = {1: 11, 3000: 12, 7: 13}  # tokens: seed


async def concurrent_sender(me: Rank) -> None:
    offers = await asyncio.gather(*(me.transport.offer(random_kv(n, seed), lease_s=LEASE) for n, seed in SIZES.items()))
    me.post("concurrent/offers", [Offered(offer.handle, offer.layout) for offer in offers])
    me.take("concurrent/acked")
    for offer in offers:
        assert await me.transport.release(offer.handle)


async def concurrent_receiver(me: Rank) -> None:
    offered = me.take_offers("concurrent/offers")
    got = await asyncio.gather(*(me.fetch(offer) for offer in reversed(offered)))
    for data, (tokens, seed) in zip(reversed(got), SIZES.items()):
        assert torch.equal(data, random_kv(tokens, seed).data)
    me.post("concurrent/acked")


async def expiry_sender(me: Rank) -> None:
    short = await me.transport.offer(random_kv(5, 21), lease_s=5.0)
    me.post("expiry/offer", [Offered(short.handle, short.layout)])
    me.take("expiry/fetched")
    me.clock.sleep_until(T0 + 4.999)
    assert await me.transport.expire() == []
    me.clock.sleep_until(T0 + 5.0)
    assert await me.transport.expire() == [short.handle]
    me.post("expiry/expired")


async def expiry_receiver(me: Rank) -> None:
    (offered,) = me.take_offers("expiry/offer")
    assert torch.equal(await me.fetch(offered), random_kv(5, 21).data)
    me.post("expiry/fetched")
    me.take("expiry/expired")
    with pytest.raises(KvGone):
        await me.fetch(offered)


async def bad_handle_sender(me: Rank) -> None:
    offer = await me.transport.offer(random_kv(3, 31), lease_s=LEASE)
    me.post("bad/offer", [Offered(offer.handle, offer.layout)])
    me.take("bad/done")
    assert await me.transport.release(offer.handle)


async def bad_handle_receiver(me: Rank) -> None:
    (offered,) = me.take_offers("bad/offer")
    layout = offered.layout
    theirs = msgspec.msgpack.decode(offered.handle, type=NcclHandle)
    for garbage in (b"", b"\xff\x00nonsense", msgspec.msgpack.encode({"rank": "zero"})):
        with pytest.raises(BadHandle, match="not an NCCL KV handle"):
            await me.transport.fetch(garbage, layout, timeout_s=WAIT)
    for rank, why in ((7, "ranks 0 to 1"), (-1, "ranks 0 to 1"), (RECEIVER, "two ranks")):
        handle = msgspec.msgpack.encode(NcclHandle(rank=rank, epoch=theirs.epoch, tag=theirs.tag))
        with pytest.raises(BadHandle, match=why):
            await me.transport.fetch(handle, layout, timeout_s=WAIT)
    for stale in (NcclHandle(rank=SENDER, epoch=theirs.epoch + 1, tag=theirs.tag), NcclHandle(rank=SENDER, epoch=theirs.epoch, tag=999)):
        with pytest.raises(KvGone):  # another life of the sender, or a tag it never gave out
            await me.transport.fetch(msgspec.msgpack.encode(stale), layout, timeout_s=WAIT)
    with pytest.raises(LayoutMismatch, match="holds 1536 bytes, the layout says 2048"):
        await me.fetch(offered, msgspec.structs.replace(layout, num_tokens=4))
    assert torch.equal(await me.fetch(offered), random_kv(3, 31).data), "a refused pull leaves the pair working"
    me.post("bad/done")


async def abandoned_sender(me: Rank) -> None:
    offer = await me.transport.offer(random_kv(4, 51), lease_s=LEASE)
    me.post("abandoned/offer", [Offered(offer.handle, offer.layout)])
    me.take("abandoned/done")
    assert await me.transport.release(offer.handle)


async def abandoned_receiver(me: Rank) -> None:
    """A pull whose receiver gave up before the answer: the sender must not send (gloo would block it for good)."""
    (offered,) = me.take_offers("abandoned/offer")
    protocol = dist.PrefixStore("tropical:kv", me.store)  # the store protocol of tropical.kv.nccl, spoken by hand
    number = int(protocol.add(f"{SENDER}/requests", 1))
    protocol.set(f"{SENDER}/reply/{number}", b"abandoned")
    pull = NcclPull(handle=offered.handle, receiver=RECEIVER, nbytes=layout_nbytes(offered.layout))
    protocol.set(f"{SENDER}/request/{number}", msgspec.msgpack.encode(pull))
    assert torch.equal(await me.fetch(offered), random_kv(4, 51).data), "the pull after it was answered"
    assert not protocol.check([f"{SENDER}/reply/{number}"]), "the sender cleared the abandoned reply"
    me.post("abandoned/done")


async def records_sender(me: Rank) -> None:
    check_records(me, "offer")


async def records_receiver(me: Rank) -> None:
    check_records(me, "fetch")


def check_records(me: Rank, direction: str) -> None:
    assert me.records, "nothing was recorded"
    assert {(record.transport, record.direction) for record in me.records} == {(KvTransport.NCCL, direction)}
    assert all(record.nbytes > 0 and record.duration_s >= 0 for record in me.records)
    assert {record.nbytes for record in me.records} >= {2 * 2 * 3000 * 2 * 16 * 4, 2 * 2 * 1 * 2 * 16 * 4}


async def close_sender(me: Rank) -> None:
    offer = await me.transport.offer(random_kv(2, 41), lease_s=LEASE)
    await me.transport.close()
    assert not me.transport.serving and me.transport.leases == {}
    me.post("close/offer", [Offered(offer.handle, offer.layout)])
    me.take("close/done")


async def close_receiver(me: Rank) -> None:
    (offered,) = me.take_offers("close/offer")
    with pytest.raises(FetchTimeout, match="in time|within"):  # nobody serves a closed rank's pulls
        await me.transport.fetch(offered.handle, offered.layout, timeout_s=0.5)
    me.post("close/done")


Half = Callable[[Rank], Awaitable[None]]
SCRIPT: Final[dict[str, tuple[Half, Half]]] = {
    "engine_round_trip_decodes_the_same_tokens": (engine_sender, engine_receiver),
    "concurrent_offers_of_any_size_do_not_mix": (concurrent_sender, concurrent_receiver),
    "an_expired_lease_is_gone_without_an_ack": (expiry_sender, expiry_receiver),
    "bad_handles_and_layouts_are_refused": (bad_handle_sender, bad_handle_receiver),
    "an_abandoned_pull_is_not_sent": (abandoned_sender, abandoned_receiver),
    "transfers_are_recorded": (records_sender, records_receiver),
    "a_closed_sender_stops_serving": (close_sender, close_receiver),
}


# --- the two processes ---------------------------------------------------------------------


def run_rank(port: int, rank: int, backend: str) -> None:
    """A rank's process: join the group, run its half of every scenario, report each outcome to the store."""
    torch.set_num_threads(1)
    device = "cpu" if backend == "gloo" else f"cuda:{rank}"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=WAIT))
    outcomes: dict[str, str] = {}
    try:
        group_store = dist.PrefixStore("group", store)
        dist.init_process_group(backend, store=group_store, rank=rank, world_size=2, timeout=timedelta(seconds=WAIT))
        outcomes = asyncio.run(run_script(Rank(rank, store, device)))
    except Exception:
        outcomes["setup"] = traceback.format_exc()
    finally:
        store.set(f"outcomes/{rank}", msgspec.msgpack.encode(outcomes))
        if dist.is_initialized():
            dist.destroy_process_group()


async def run_script(me: Rank) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    try:
        for name, halves in SCRIPT.items():
            me.scenario = name
            try:
                await halves[me.rank](me)
                outcomes[name] = ""
            except Exception:
                outcomes[name] = traceback.format_exc()
            me.end_scenario(failed=bool(outcomes[name]))
    finally:
        await me.transport.close()
    return outcomes


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (it refuses two ranks on one)")


@pytest.fixture(scope="module", params=["gloo", pytest.param("nccl", marks=TWO_GPUS)])
def outcomes(request: pytest.FixtureRequest) -> Iterator[dict[int, dict[str, str]]]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=RUN_WAIT))
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=run_rank, args=(store.port, rank, request.param), name=f"kv-rank{rank}") for rank in (SENDER, RECEIVER)]
    for process in ranks:
        process.start()
    try:
        store.wait([f"outcomes/{rank}" for rank in (SENDER, RECEIVER)], timedelta(seconds=RUN_WAIT))
        yield {rank: msgspec.msgpack.decode(store.get(f"outcomes/{rank}"), type=dict[str, str]) for rank in (SENDER, RECEIVER)}
    finally:
        for process in ranks:
            process.join(timeout=WAIT)
            if process.is_alive():
                process.kill()
                process.join(timeout=WAIT)
    assert [process.exitcode for process in ranks] == [0, 0]


@pytest.mark.parametrize("scenario", ["setup", *SCRIPT])
def test_scenario(outcomes: dict[int, dict[str, str]], scenario: str) -> None:
    if scenario == "setup":
        assert all("setup" not in per_rank for per_rank in outcomes.values()), outcomes
        return
    failures = {rank: per_rank.get(scenario, "never ran") for rank, per_rank in outcomes.items()}
    assert failures == {SENDER: "", RECEIVER: ""}, "\n".join(f"rank {r}:\n{text}" for r, text in failures.items() if text)
