"""One settings object for every service: defaults, then TROPICAL_* variables, then CLI flags."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tropical.redis_url import SENTINEL_SCHEME, SentinelUrl

MEMORY_URL = "memory://"
SECRETS_DIR = "/run/secrets"


class Settings(BaseSettings):
    """Where the broker and store are, and the knobs every service shares.

    `memory://` for either URL selects the in-process implementation (the
    embedded default, with no servers at all).
    """

    # A secret may also come from a file named after its variable (`/run/secrets/TROPICAL_BROKER_URL`, as compose
    # mounts secrets); the environment wins over the file.
    model_config = SettingsConfigDict(
        env_prefix="TROPICAL_", frozen=True, extra="forbid", secrets_dir=SECRETS_DIR if os.path.isdir(SECRETS_DIR) else None
    )

    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "tropical"
    queue_type: Literal["classic", "quorum"] = "classic"  # quorum: work queues replicated across a RabbitMQ cluster
    worker_id: str | None = None
    prefetch: Annotated[int, Field(ge=1, le=65535)] = 16
    router_prefetch: Annotated[int, Field(ge=1, le=65535)] = 4096  # the router holds every queued request unacked until placed
    router_lease_ttl_s: Annotated[float, Field(gt=0)] = 2.0  # a standby router takes over this long after the active one dies
    # strict admission (`unified`): a predicted first token must leave this much before its deadline, and a placement is
    # taken to reach its worker this long after the decision (0: as the simulator, which has no hops and no jitter)
    admission_headroom_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0
    dispatch_lead_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0
    max_message_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    status_ttl_s: Annotated[float, Field(gt=0)] = 5.0
    redis_resubscribe_timeout_s: Annotated[float, Field(gt=0)] = 60.0  # how long a lost update feed keeps trying
    request_record_ttl_s: Annotated[float, Field(gt=0)] = 3600.0
    default_ttft_slo_ms: Annotated[float, Field(gt=0)] = 1000.0
    default_tpot_slo_ms: Annotated[float, Field(gt=0)] = 100.0
    token_flush_ms: Annotated[float, Field(ge=0)] = 20.0  # a stream's tokens wait this long to share a message (the first never waits)
    log_level: str = "INFO"
    api_keys: str = ""  # comma-separated keys the gateway accepts as `Authorization: Bearer KEY`; empty: no key needed
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None  # a service's Prometheus `/metrics` port; None: not served

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, url: str) -> str:
        if not url.startswith(("amqp://", "amqps://", MEMORY_URL)):
            raise ValueError(f"broker_url must start with amqp://, amqps:// or {MEMORY_URL}")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if url.startswith(SENTINEL_SCHEME):
            SentinelUrl.parse(url)  # a malformed one is refused now, not at the first command
        elif not url.startswith(("redis://", "rediss://", "unix://", MEMORY_URL)):
            raise ValueError(f"redis_url must start with redis://, rediss://, unix://, {SENTINEL_SCHEME} or {MEMORY_URL}")
        return url

    @field_validator("log_level")
    @classmethod
    def _level(cls, level: str) -> str:
        level = level.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    def with_overrides(self, **overrides: Any) -> Settings:
        """CLI flags win over the environment; a flag left unset (None) changes nothing."""
        given = {key: value for key, value in overrides.items() if value is not None}
        return Settings(**{**self.model_dump(), **given}) if given else self

    def api_key_set(self) -> frozenset[str]:
        """The gateway's accepted API keys (empty: none needed)."""
        return frozenset(key.strip() for key in self.api_keys.split(",") if key.strip())

    def queue(self, name: str) -> str:
        """A queue's full name in this deployment's namespace."""
        return f"{self.namespace}.{name}"

    def redacted(self) -> dict[str, Any]:
        """The settings with passwords in URLs masked, for logs and `tropical settings`."""
        values = self.model_dump()
        for key in ("broker_url", "redis_url"):
            values[key] = mask_password(values[key])
        values["api_keys"] = f"{len(self.api_key_set())} key(s)"
        return values


def mask_password(url: str) -> str:
    """The URL with its password, if any, as `***`: fit for a log line or an error message."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
