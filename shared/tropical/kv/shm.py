"""POSIX shared-memory segments holding leased KV, named so a stray name is recognised as foreign.

The owner creates a segment with `multiprocessing.shared_memory`, which also
registers it with the resource tracker: if the owner dies, the tracker unlinks
what it leased. Readers open the segment with a plain `shm_open` instead, so
they never register it: a registered reader would have the tracker unlink the
owner's segment when the reader exits (and, in the owner's own process,
unregister the owner's entry).
"""

from __future__ import annotations

import os
import re
import uuid
from multiprocessing.shared_memory import SharedMemory
from typing import Final

import _posixshmem  # what multiprocessing.shared_memory itself opens segments with
import torch

from tropical.kv.base import BadHandle, KvGone, LayoutMismatch, as_bytes

PREFIX: Final = "tropical-kv-"
_NAME: Final = re.compile(rf"{PREFIX}[0-9a-f]{{32}}")


def new_name() -> str:
    return f"{PREFIX}{uuid.uuid4().hex}"


def check_name(handle: bytes) -> str:
    """The segment name a handle holds; BadHandle for anything this module would not have named."""
    name = handle.decode("ascii", errors="replace")
    if not _NAME.fullmatch(name):
        raise BadHandle(f"{handle[:80]!r} is not a KV shared-memory segment name ({PREFIX}<32 hex digits>)")
    return name


def create(data: torch.Tensor) -> SharedMemory:
    """A new segment holding the tensor's bytes; the caller owns it and must `remove` it."""
    source = as_bytes(data.cpu())
    segment = SharedMemory(name=new_name(), create=True, size=max(1, source.numel()))
    try:
        torch.frombuffer(segment.buf, dtype=torch.uint8, count=source.numel()).copy_(source)
    except BaseException:
        remove(segment)
        raise
    return segment


def remove(segment: SharedMemory) -> None:
    """Unlink the name at once; the mapping goes when its last view does (readers keep theirs)."""
    try:
        segment.unlink()
    except FileNotFoundError:
        pass
    try:
        segment.close()
    except BufferError:  # a view is still exported; the mapping is released with it
        pass


def read(name: str, nbytes: int) -> torch.Tensor:
    """A private copy of a segment's bytes as a flat uint8 tensor; KvGone if the name is unlinked."""
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        raise KvGone(f"shared-memory segment {name} is gone (released or expired)") from None
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise LayoutMismatch(f"segment {name} holds {size} bytes, the layout says {nbytes}")
        out = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(out.numpy())
        done = 0
        while done < nbytes:
            count = os.preadv(fd, [view[done:]], done)
            if count == 0:
                raise LayoutMismatch(f"segment {name} ended after {done} of {nbytes} bytes")
            done += count
        return out
    finally:
        os.close(fd)


def exists(name: str) -> bool:
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        return False
    os.close(fd)
    return True
