"""The Redis store: cluster state shared by every process of a deployment.

Everything lives under the deployment's prefix P:

    P:worker_status:<worker_id>    a worker's encoded status, expiring (PX)
    P:worker_statuses              set of worker ids, so listing needs no SCAN
    P:latency_models               hash from LatencyModelSpec.key to the model
    P:latency_models:updates       pub/sub channel carrying each model as set
    P:request_record:<request_id>  a request's encoded record, expiring (PX)
    P:lease:<name>                 the lease's holder, expiring (PX); taken with SET NX

The URL names one server (`redis://`, `rediss://`, `unix://`) or the sentinels
watching a primary (`redis+sentinel://`, see `tropical.redis_url`): then each
new connection goes where the sentinels say the primary is, and a command that
finds the old primary demoted or gone is retried there, so a failover is
followed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tropical.protocol import LatencyModelSpec, RequestRecord, WorkerStatus, encode
from tropical.redis_url import SENTINEL_SCHEME, SentinelUrl
from tropical.store.base import LatencyModelUpdates, Store
from tropical.store.errors import StoreClosed, StoreError
from tropical.store.feed import QueuedUpdates
from tropical.store.values import DecodedListing, check_holder, check_ttl, decode_listing, decode_value

DEFAULT_SUBSCRIBE_TIMEOUT_S: Final = 5.0
DEFAULT_RESUBSCRIBE_TIMEOUT_S: Final = 60.0
RESUBSCRIBE_FIRST_DELAY_S: Final = 0.05
RESUBSCRIBE_MAX_DELAY_S: Final = 2.0
SENTINEL_TIMEOUT_S: Final = 5.0  # asking one sentinel where the primary is; then the next one is asked
FAILOVER_RETRIES: Final = 6  # a command that lost its primary asks the sentinels again this often, backing off up to 1 s
RECONNECT_RETRIES: Final = 8  # a command whose connection a restarting server closed is tried again this often
SOCKET_TIMEOUT_S: Final = 5.0  # one command's wait on a server that does not answer

log = logging.getLogger(__name__)

# Drops ids from the index whose status key is gone. It checks again inside
# Redis, atomically, so a worker that heartbeats between the listing's read and
# this prune keeps its place. KEYS[1] is the index; KEYS[i + 1] belongs to ARGV[i].
_PRUNE_SCRIPT: Final = """
local removed = 0
for i, member in ipairs(ARGV) do
    if redis.call('EXISTS', KEYS[i + 1]) == 0 then
        removed = removed + redis.call('SREM', KEYS[1], member)
    end
end
return removed
"""


# Only the holder renews or releases: the check and the change are one step inside Redis, so a holder whose
# lease lapsed and was taken meanwhile cannot extend or delete the new holder's. KEYS[1] is the lease.
_RENEW_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore(Store):
    """Owns its client: closing the store closes the client's connection pool."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        subscribe_timeout_s: float = DEFAULT_SUBSCRIBE_TIMEOUT_S,
        resubscribe_timeout_s: float = DEFAULT_RESUBSCRIBE_TIMEOUT_S,
    ) -> None:
        if not prefix:
            raise ValueError("the key prefix must not be empty")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the store reads raw bytes: make the client with decode_responses=False")
        self.prefix = prefix
        self._client = client
        self._subscribe_timeout_s = subscribe_timeout_s
        self.resubscribe_timeout_s = resubscribe_timeout_s
        self._prune = client.register_script(_PRUNE_SCRIPT)
        self._renew = client.register_script(_RENEW_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)
        self._status_listing = DecodedListing(WorkerStatus)
        self._subscriptions: set[_RedisUpdates] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, prefix: str, **timeouts_s: float) -> RedisStore:
        """`timeouts_s`: `subscribe_timeout_s`, `resubscribe_timeout_s`, as for the constructor."""
        return cls(connect_redis(url), prefix=prefix, **timeouts_s)

    # --- the key layout, public so operators and tests can find the data
    def worker_status_key(self, worker_id: str) -> str:
        return f"{self.prefix}:worker_status:{worker_id}"

    @property
    def worker_index_key(self) -> str:
        return f"{self.prefix}:worker_statuses"

    @property
    def latency_models_key(self) -> str:
        return f"{self.prefix}:latency_models"

    @property
    def latency_models_channel(self) -> str:
        return f"{self.prefix}:latency_models:updates"

    def latency_model_location(self, key: str) -> str:
        """How errors name one model: its hash and field."""
        return f"{self.latency_models_key}[{key}]"

    def request_record_key(self, request_id: str) -> str:
        return f"{self.prefix}:request_record:{request_id}"

    def lease_key(self, name: str) -> str:
        return f"{self.prefix}:lease:{name}"

    # --- worker status
    async def put_worker_status(self, status: WorkerStatus, *, ttl_s: float) -> None:
        self._check_open()
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(self.worker_status_key(status.worker_id), encode(status), px=_milliseconds(ttl_s))
            pipe.sadd(self.worker_index_key, status.worker_id)
            await pipe.execute()

    async def get_worker_status(self, worker_id: str) -> WorkerStatus | None:
        self._check_open()
        key = self.worker_status_key(worker_id)
        data = await self._client.get(key)
        return None if data is None else decode_value(_raw(data), WorkerStatus, key=key, name=worker_id)

    async def list_worker_statuses(self) -> list[WorkerStatus]:
        self._check_open()
        members = await self._client.smembers(self.worker_index_key)
        ids = sorted(_raw(member).decode(errors="replace") for member in members)
        if not ids:
            return []
        keys = [self.worker_status_key(worker_id) for worker_id in ids]
        values = [None if data is None else _raw(data) for data in await self._client.mget(keys)]
        expired = [(key, worker_id) for key, worker_id, data in zip(keys, ids, values) if data is None]
        if expired:
            await self._prune(
                keys=[self.worker_index_key, *(key for key, _ in expired)],
                args=[worker_id for _, worker_id in expired],
            )
        live = [(key, worker_id, data) for key, worker_id, data in zip(keys, ids, values) if data is not None]
        return self._status_listing.decode(live)

    async def remove_worker_status(self, worker_id: str) -> None:
        self._check_open()
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self.worker_status_key(worker_id))
            pipe.srem(self.worker_index_key, worker_id)
            await pipe.execute()

    # --- latency models
    async def set_latency_model(self, model: LatencyModelSpec) -> None:
        """One transaction, so the order of updates is the order of the stored values."""
        self._check_open()
        data = encode(model)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self.latency_models_key, model.key, data)
            pipe.publish(self.latency_models_channel, data)
            await pipe.execute()

    async def get_latency_model(self, key: str) -> LatencyModelSpec | None:
        self._check_open()
        data = await self._client.hget(self.latency_models_key, key)
        if data is None:
            return None
        return decode_value(_raw(data), LatencyModelSpec, key=self.latency_model_location(key), name=key)

    async def list_latency_models(self) -> list[LatencyModelSpec]:
        self._check_open()
        fields = await self._client.hgetall(self.latency_models_key)
        named = sorted((_raw(field).decode(errors="replace"), _raw(data)) for field, data in fields.items())
        return decode_listing(((self.latency_model_location(key), key, data) for key, data in named), LatencyModelSpec)

    async def subscribe_latency_models(self) -> LatencyModelUpdates:
        """Returns only once Redis confirms the subscription, so no later update is missed.

        A lost connection does not end the feed: it subscribes again, then
        replays every stored model, since updates published meanwhile are gone
        from the channel. A reader may so see a model twice, or an older value
        just before the current one, but the last update it sees for each key
        is the stored value. Only when Redis stays out of reach for
        `resubscribe_timeout_s` does the feed end with a StoreError.
        """
        self._check_open()
        updates = _RedisUpdates(
            await self._subscribed(), self.latency_models_channel, self._subscriptions, self._resubscribe, self._stored_models
        )
        self._subscriptions.add(updates)
        return updates

    async def _subscribed(self) -> PubSub:
        pubsub = self._client.pubsub()
        try:
            async with asyncio.timeout(self._subscribe_timeout_s):
                await pubsub.subscribe(self.latency_models_channel)
                await _confirmation(pubsub)
        except TimeoutError:
            await pubsub.aclose()
            raise StoreError(
                f"Redis did not confirm the subscription to {self.latency_models_channel}"
                f" within {self._subscribe_timeout_s} s"
            ) from None
        except BaseException:
            await pubsub.aclose()
            raise
        return pubsub

    async def _stored_models(self) -> list[bytes]:
        stored = await self._client.hgetall(self.latency_models_key)
        return [_raw(data) for _, data in sorted(stored.items())]

    async def _resubscribe(self) -> tuple[PubSub, list[bytes]]:
        """A new confirmed subscription and the stored models, retried with backoff until the deadline."""
        deadline = asyncio.get_running_loop().time() + self.resubscribe_timeout_s
        delay = RESUBSCRIBE_FIRST_DELAY_S
        while True:
            self._check_open()
            try:
                pubsub = await self._subscribed()
                try:
                    stored = await self._client.hgetall(self.latency_models_key)
                except BaseException:
                    await pubsub.aclose()
                    raise
                return pubsub, [_raw(data) for _, data in sorted(stored.items())]
            except (RedisError, OSError, StoreError) as exc:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise StoreError(
                        f"lost the subscription to {self.latency_models_channel} and could not renew it"
                        f" within {self.resubscribe_timeout_s} s: {exc}"
                    ) from exc
            await asyncio.sleep(delay)
            delay = min(2 * delay, RESUBSCRIBE_MAX_DELAY_S)

    # --- request records
    async def put_request_record(self, record: RequestRecord, *, ttl_s: float) -> None:
        self._check_open()
        await self._client.set(self.request_record_key(record.request_id), encode(record), px=_milliseconds(ttl_s))

    async def get_request_record(self, request_id: str) -> RequestRecord | None:
        self._check_open()
        key = self.request_record_key(request_id)
        data = await self._client.get(key)
        return None if data is None else decode_value(_raw(data), RequestRecord, key=key, name=request_id)

    async def delete_request_record(self, request_id: str) -> None:
        self._check_open()
        await self._client.delete(self.request_record_key(request_id))

    # --- leases: Redis errors become StoreError, which a holder rides out until its lease would have lapsed
    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        self._check_open()
        with _as_store_error("take", name):
            return bool(await self._client.set(self.lease_key(name), check_holder(holder), px=_milliseconds(ttl_s), nx=True))

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        self._check_open()
        with _as_store_error("renew", name):
            return bool(await self._renew(keys=[self.lease_key(name)], args=[check_holder(holder), _milliseconds(ttl_s)]))

    async def release_lease(self, name: str, holder: str) -> None:
        self._check_open()
        with _as_store_error("release", name):
            await self._release(keys=[self.lease_key(name)], args=[check_holder(holder)])

    async def lease_holder(self, name: str) -> str | None:
        self._check_open()
        with _as_store_error("read", name):
            data = await self._client.get(self.lease_key(name))
        return None if data is None else _raw(data).decode(errors="replace")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for updates in list(self._subscriptions):
            await updates.close()
        await self._client.aclose(close_connection_pool=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the Redis store for {self.prefix!r} is closed")


Resubscribe = Callable[[], Awaitable[tuple[PubSub, list[bytes]]]]


class _RedisUpdates(QueuedUpdates):
    """A reader task moves messages from the subscription's connection into the queue.

    Reading in one task, not in whoever iterates, lets close() stop it at any
    moment without leaving a half-read reply on the connection. When the
    connection is lost the same task renews the subscription (`resubscribe`).
    """

    def __init__(
        self, pubsub: PubSub, channel: str, registry: set[_RedisUpdates], resubscribe: Resubscribe,
        stored: Callable[[], Awaitable[list[bytes]]],
    ) -> None:
        super().__init__(f"channel {channel}")
        self._pubsub = pubsub
        self._registry = registry
        self._resubscribe = resubscribe
        self._stored = stored
        self._reader = asyncio.create_task(self._read(), name=f"store-updates:{channel}")

    async def _read(self) -> None:
        try:
            while True:
                try:
                    message = await self._pubsub.get_message(timeout=None)
                except (RedisError, OSError) as exc:
                    log.warning("lost the subscription to %s (%s); subscribing again", self.source, exc)
                    await self._pubsub.aclose()
                    self._pubsub, stored = await self._resubscribe()
                    for data in stored:
                        self.push(data)
                    log.info("subscribed to %s again; replayed %d stored models", self.source, len(stored))
                    continue
                if message is None:
                    continue
                if message["type"] == "message":
                    self.push(message["data"])
                elif message["type"] == "subscribe":  # the client lost the connection and subscribed again by itself
                    stored = await self._stored()
                    for data in stored:
                        self.push(data)
                    log.info("%s: subscribed again after a lost connection; replayed %d stored models", self.source, len(stored))
        except Exception as exc:  # Redis out of reach for good, or the store closed: the reader hears of it
            self.fail(exc)

    async def _stop(self) -> None:
        self._registry.discard(self)
        self._reader.cancel()
        await asyncio.wait([self._reader])
        await self._pubsub.aclose()


async def _confirmation(pubsub: PubSub) -> None:
    """Sending SUBSCRIBE is not enough: until Redis answers, a PUBLISH could pass us by."""
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is not None and message["type"] == "subscribe":
            return


def connect_redis(url: str) -> Redis:
    """A client of the server `url` names, or of the primary its sentinels point to; it connects on its first command."""
    if not url.startswith(SENTINEL_SCHEME):
        # A server that restarted has closed every pooled connection: a command on one fails once and is retried on
        # a new connection, backing off while the server is still coming up (about RECONNECT_RETRIES × 1 s at most).
        return Redis.from_url(
            url, retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), RECONNECT_RETRIES),
            retry_on_error=[RedisConnectionError, RedisTimeoutError], socket_connect_timeout=SOCKET_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
        )
    where = SentinelUrl.parse(url)
    sentinel = Sentinel(
        list(where.sentinels),
        sentinel_kwargs={"socket_connect_timeout": SENTINEL_TIMEOUT_S, "socket_timeout": SENTINEL_TIMEOUT_S, "retry": Retry(NoBackoff(), 0)},
        db=where.db,
        username=where.username,
        password=where.password,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), FAILOVER_RETRIES),
    )
    client = sentinel.master_for(where.service, redis_class=_PrimaryRedis)
    client.sentinels = list(sentinel.sentinels)
    return client


class _PrimaryRedis(Redis):
    """The client of a Sentinel-watched primary: closing it closes its connections to the sentinels too."""

    sentinels: list[Redis]

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.sentinels:
            await sentinel.aclose()


def _raw(reply: bytes | str) -> bytes:
    """Replies are bytes, as __init__ made sure; this narrows redis-py's wider types."""
    return reply if isinstance(reply, bytes) else reply.encode()


@contextmanager
def _as_store_error(what: str, lease: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreError(f"could not {what} lease {lease!r}: {exc}") from exc


def _milliseconds(ttl_s: float) -> int:
    """PX takes whole milliseconds; rounding up keeps a tiny TTL from meaning none."""
    return max(1, math.ceil(check_ttl(ttl_s) * 1000))
