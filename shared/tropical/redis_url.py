"""Redis Sentinel URLs: where the sentinels are and which primary they watch.

A deployment that must outlive the loss of its Redis primary runs Redis with
Sentinel and names the sentinels instead of one server:

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]

PORT defaults to 26379 (Sentinel's), DB to 0; an IPv6 host is written in
brackets. USER and PASSWORD (percent-encoded where needed) log in to the Redis
servers, primary and replicas; the sentinels themselves are asked without
them. SERVICE is the name the sentinels monitor the primary under (`sentinel
monitor SERVICE ...`); every new connection asks them where it is now, so a
failover is followed.

Only parsing lives here, free of any client library, so the settings can
check a URL when they are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

SENTINEL_SCHEME: Final = "redis+sentinel://"
SENTINEL_PORT: Final = 26379
FORM: Final = f"{SENTINEL_SCHEME}[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]"


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """The URL's parts, or ValueError saying what is wrong with it."""
        if not url.startswith(SENTINEL_SCHEME):
            raise ValueError(f"a Sentinel URL starts with {SENTINEL_SCHEME}")
        rest = url[len(SENTINEL_SCHEME):]
        if "?" in rest or "#" in rest:
            raise ValueError(f"a Sentinel URL takes no query or fragment: {FORM}")
        location, _, path = rest.partition("/")
        credentials, at, hosts = location.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = credentials.partition(":")
            if not colon:
                raise ValueError(f"give the password as [USER]:PASSWORD@ in {FORM}")
            username, password = unquote(user) or None, unquote(secret)
        sentinels = tuple(_address(host) for host in hosts.split(","))
        service, _, db = path.partition("/")
        if not service:
            raise ValueError(f"name the monitored service after the sentinels: {FORM}")
        if db and not (db.isascii() and db.isdigit()):
            raise ValueError(f"the database is a number, not {db!r}: {FORM}")
        return cls(sentinels, unquote(service), int(db or 0), username, password)


def _address(host: str) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port`."""
    if host.startswith("["):
        name, bracket, port = host[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError(f"bad sentinel address {host!r}: {FORM}")
        port = port[1:]
    else:
        name, _, port = host.partition(":")
    if not name:
        raise ValueError(f"a sentinel address needs a host, not {host!r}: {FORM}")
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad port in sentinel address {host!r}: {FORM}")
    return name, int(port) if port else SENTINEL_PORT
