"""The KV cache tensors: one allocation for every layer, sized from a memory budget."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tropical.engine.attention import LayerCache
from tropical.engine.config import ModelConfig


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of `block_size` tokens across all layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element


class KvCache:
    """Keys and values of every layer in one allocation, in the attention backend's layout.

    `head_major`: `[2, layers, kv_heads, blocks * block_size, head_dim]`;
    otherwise `[2, layers, blocks, block_size, kv_heads, head_dim]`. Exports
    are token-major, `[2, layers, tokens, kv_heads, head_dim]`, whatever the
    layout or block size, so an engine can import from one set up differently.

    One block more than `num_blocks` is allocated: the scratch block, never
    given to a sequence, where padding rows of a fixed-shape step write.
    """

    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        head_major: bool,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.head_major = head_major
        self.scratch_block = num_blocks
        heads, dim, layers = model.num_kv_heads, model.head_dim, model.num_layers
        if head_major:
            shape: tuple[int, ...] = (2, layers, heads, (num_blocks + 1) * block_size, dim)
        else:
            shape = (2, layers, num_blocks + 1, block_size, heads, dim)
        self.data = torch.empty(shape, dtype=dtype, device=device)  # every slot is written before it is read
        self.layers: list[LayerCache] = [(self.data[0, i], self.data[1, i]) for i in range(layers)]

    def _slots(self, block_table: Sequence[int], num_tokens: int) -> torch.Tensor:
        blocks = torch.tensor(block_table, dtype=torch.long, device=self.data.device)
        offsets = torch.arange(self.block_size, device=self.data.device)
        return (blocks[:, None] * self.block_size + offsets).flatten()[:num_tokens]

    def read(self, block_table: Sequence[int], num_tokens: int) -> torch.Tensor:
        """A copy of the first `num_tokens` tokens' keys and values, token-major."""
        slots = self._slots(block_table, num_tokens)
        if self.head_major:
            return self.data[:, :, :, slots].transpose(2, 3).contiguous()
        return self.data.flatten(2, 3)[:, :, slots]

    def write(self, block_table: Sequence[int], kv: torch.Tensor) -> None:
        """Store token-major keys and values (from `read`, maybe another engine's) into these blocks."""
        slots = self._slots(block_table, kv.shape[2])
        kv = kv.to(self.data.device, self.data.dtype)
        if self.head_major:
            self.data[:, :, :, slots] = kv.transpose(2, 3)
        else:
            self.data.flatten(2, 3)[:, :, slots] = kv
