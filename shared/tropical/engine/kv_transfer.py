"""A finished prefill's KV cache in a form another engine can take over.

The data is token-major, `[2 (keys, values), layers, tokens, kv_heads,
head_dim]`, so it does not depend on either side's block size. It travels as
raw host bytes (shared memory, Redis) or, between processes on one GPU, as a
CUDA IPC handle: plain fields, msgpack-encodable, nothing pickled.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import torch

from tropical.protocol import KvLayout, SamplingParams

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class KvExport:
    """Everything the receiving engine needs to continue a sequence as if it had run there.

    The cache holds the first `num_tokens` tokens of prompt + outputs; the
    tokens after them (normally just the first output) are computed by the
    receiver's next step.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    block_size: int  # the sender's, for the record
    data: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def layout(self) -> KvLayout:
        _, layers, tokens, kv_heads, head_dim = self.data.shape
        return KvLayout(
            num_layers=layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            block_size=self.block_size,
            num_tokens=tokens,
            dtype=DTYPE_NAMES[self.data.dtype],  # type: ignore[arg-type]
        )


def kv_to_bytes(data: torch.Tensor) -> bytes:
    """The raw host bytes of a KV export (native byte order), for shared memory or Redis."""
    return data.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def kv_from_bytes(layout: KvLayout, buffer: bytes | bytearray | memoryview) -> torch.Tensor:
    shape = (2, layout.num_layers, layout.num_tokens, layout.num_kv_heads, layout.head_dim)
    dtype = DTYPES[layout.dtype]
    expected = 2 * layout.num_layers * layout.num_tokens * layout.num_kv_heads * layout.head_dim
    expected *= torch.empty((), dtype=dtype).element_size()
    if len(buffer) != expected:
        raise ValueError(f"KV buffer has {len(buffer)} bytes, its layout says {expected}")
    return torch.frombuffer(bytearray(buffer), dtype=dtype).view(shape)


class CudaIpcHandle(msgspec.Struct, frozen=True, kw_only=True):
    """What another process needs to map a tensor of this process's GPU memory (see torch.multiprocessing)."""

    shape: list[int]
    stride: list[int]
    offset: int
    dtype: str
    device: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


def share_cuda(tensor: torch.Tensor) -> CudaIpcHandle:
    """A handle to `tensor`; the sender must keep `tensor` alive until the receiver acks its copy."""
    from torch.multiprocessing.reductions import reduce_tensor

    if tensor.device.type != "cuda":
        raise ValueError("only a CUDA tensor can be shared over CUDA IPC")
    _, args = reduce_tensor(tensor.detach())
    _, size, stride, offset, _, dtype, device, handle, size_bytes, offset_bytes, _, *events = args
    ref_counter, ref_counter_offset, event, event_sync = events
    return CudaIpcHandle(
        shape=list(size),
        stride=list(stride),
        offset=offset,
        dtype=DTYPE_NAMES[dtype],
        device=device,
        handle=handle,
        storage_size_bytes=size_bytes,
        storage_offset_bytes=offset_bytes,
        ref_counter_handle=ref_counter,
        ref_counter_offset=ref_counter_offset,
        event_handle=event,
        event_sync_required=event_sync,
    )


def open_cuda(handle: CudaIpcHandle) -> torch.Tensor:
    """Map the sender's tensor into this process (no copy); copy out of it before acking."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(handle.shape),
        tuple(handle.stride),
        handle.offset,
        torch.storage.TypedStorage,
        DTYPES[handle.dtype],
        handle.device,
        handle.handle,
        handle.storage_size_bytes,
        handle.storage_offset_bytes,
        False,
        handle.ref_counter_handle,
        handle.ref_counter_offset,
        handle.event_handle,
        handle.event_sync_required,
    )
