"""Private RabbitMQ and Redis servers for the fault scenarios that restart one.

A scenario never stops the machine's shared servers (5672, 6379): it starts
its own on free ports, with everything in a temporary folder, points the
deployment at it, and stops and starts it again on the same port mid-load.

- RabbitMQ: its own node name, AMQP and distribution ports, a config file
  with `listeners.tcp.default = 127.0.0.1:PORT` and no plugins (so no
  management listener), and its mnesia, logs, feature flags and Erlang cookie
  (`HOME`) in the folder. It runs as the current user from the installed
  `rabbitmq-server` script (Debian's `/usr/lib/rabbitmq/bin/rabbitmq-server`,
  not the `/usr/sbin` wrapper that switches to the `rabbitmq` user and drops
  the environment). It boots in seconds to tens of seconds; SIGTERM stops it
  cleanly. The mnesia folder outlives a restart, so durable queues and
  persistent messages come back with it, as on a real broker.
- Redis: `redis-server --port P --save '' --appendonly no`: a restart loses
  every key, the worst case a deployment's store must ride out.

A server is up when its port takes connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self

BOOT_TIMEOUT_S = 120.0  # RabbitMQ on a loaded machine
STOP_TIMEOUT_S = 60.0
DEBIAN_RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class ServerMissing(RuntimeError):
    """The server's program is not installed here."""


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def port_open(port: int, timeout_s: float = 1.0) -> bool:
    """Whether something on 127.0.0.1 accepts connections on `port`."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await asyncio.wait_for(writer.wait_closed(), timeout=timeout_s)
    return True


class PrivateServer(ABC):
    """A server of this run's own on a fixed port, in a temporary folder; `restart` stops it and starts it on the same port.

    `pids` lists the process of every start, so a caller can tell a restart
    really happened; `refused_while_down` whether the port refused
    connections between the last stop and the next start.
    """

    kind = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.pids: list[int] = []
        self.refused_while_down: bool | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._process: asyncio.subprocess.Process | None = None

    @property
    @abstractmethod
    def url(self) -> str: ...

    @abstractmethod
    def command(self, folder: Path) -> tuple[list[str], dict[str, str]]:
        """The program, its arguments and its environment."""

    def prepare(self, folder: Path) -> None:
        """Write what the server reads before its first start."""

    @property
    def folder(self) -> Path:
        if self._folder is None:
            raise RuntimeError(f"the private {self.kind} is not open")
        return Path(self._folder.name)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def __aenter__(self) -> Self:
        self._folder = tempfile.TemporaryDirectory(prefix=f"tropical-chaos-{self.kind}-")
        try:
            self.prepare(self.folder)
            await self.start()
        except BaseException:
            await self.stop()
            self._folder.cleanup()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            await self.stop()
        finally:
            if self._folder is not None:
                self._folder.cleanup()

    async def start(self) -> None:
        """Start it and wait until its port takes connections; RuntimeError (with its log's tail) if it exits or is not up in time."""
        program, env = self.command(self.folder)
        if await port_open(self.port):  # someone else's: its answering would pass for ours
            raise RuntimeError(f"port {self.port} of the private {self.kind} is taken")
        with (self.folder / "server.log").open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *program, env=env, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
            )
        self.pids.append(self._process.pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOOT_TIMEOUT_S
        while not await port_open(self.port):
            if self._process.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise RuntimeError(f"the private {self.kind} on port {self.port} did not start: {self.log_tail()}")
            await asyncio.sleep(0.1)  # polling the port: a server says nothing when it is ready

    async def stop(self) -> None:
        """SIGTERM and wait for it to exit (killed if it does not in time); then note whether its port refuses connections."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # its whole group: RabbitMQ's script runs the Erlang VM as a child
                await asyncio.wait_for(process.wait(), timeout=STOP_TIMEOUT_S)
        self.refused_while_down = not await port_open(self.port)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def log_tail(self, lines: int = 8) -> str:
        log = self.folder / "server.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


class PrivateRabbitMQ(PrivateServer):
    kind = "rabbitmq"

    def __init__(self) -> None:
        super().__init__()
        self.dist_port = free_port()
        self.node = f"tropical-chaos-{uuid.uuid4().hex[:8]}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def prepare(self, folder: Path) -> None:
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq/rabbitmq-env.conf

    def command(self, folder: Path) -> tuple[list[str], dict[str, str]]:
        program = str(DEBIAN_RABBITMQ_SERVER) if DEBIAN_RABBITMQ_SERVER.exists() else shutil.which("rabbitmq-server")
        if program is None:
            raise ServerMissing("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
        env = {
            **{key: value for key, value in os.environ.items() if not key.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(folder),  # its own Erlang cookie
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(folder / "feature_flags"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",  # an epmd it starts listens on loopback only
        }
        return [program], env


class PrivateRedis(PrivateServer):
    kind = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, folder: Path) -> tuple[list[str], dict[str, str]]:
        program = shutil.which("redis-server")
        if program is None:
            raise ServerMissing("redis-server is not installed (Debian: apt-get install redis-server)")
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder), "--daemonize", "no"]
        return [program, *arguments], dict(os.environ)
