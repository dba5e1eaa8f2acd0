"""Block accounting for the paged KV cache: which blocks are free, and which go to whom. No tensors.

Any free block serves any sequence, so capacity is exactly that of a plain
paged cache. Placement only tries to keep each sequence's blocks adjacent,
because attention reads an adjacent context in place and must gather a
scattered one (a copy per layer per step, which dominates CPU decode steps):
a sequence grows into the block after its last one when that is free, and a
new sequence starts in the middle of the largest free run (or as far in as
leaves room for the blocks it needs now), leaving the sequence before the run
the rest to grow into.
"""

from __future__ import annotations

import numpy as np


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks right now (a request that could never fit is refused earlier)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = np.ones(num_blocks, dtype=bool)
        self._num_free = num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def room(self, block_table: list[int], num_tokens: int) -> int:
        """How many more tokens a sequence holding `num_tokens` could store, in its own blocks and all free ones."""
        return (len(block_table) + self._num_free) * self.block_size - num_tokens

    def missing(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks `block_table` lacks to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.missing(block_table, num_tokens) <= self._num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to `block_table` until it holds `num_tokens` tokens."""
        missing = self.missing(block_table, num_tokens)
        if missing > self._num_free:
            raise OutOfBlocks(f"{missing} KV blocks needed, {self._num_free} free")
        self._num_free -= missing
        while missing:
            start = self._next_block(block_table, missing)
            length = 1 if missing == 1 else self._free_run(start, missing)
            self._free[start : start + length] = False
            block_table.extend(range(start, start + length))
            missing -= length

    def release(self, block_table: list[int]) -> None:
        self._free[block_table] = True
        self._num_free += len(block_table)
        block_table.clear()

    def _free_run(self, start: int, most: int) -> int:
        """How many blocks from the free block `start` on are free, up to `most`."""
        run = self._free[start : start + most]
        return len(run) if run.all() else int(run.argmin())

    def _next_block(self, block_table: list[int], wanted: int) -> int:
        if block_table:
            after = block_table[-1] + 1
            if after < self.num_blocks and self._free[after]:
                return after
        return self._place(wanted)

    def _place(self, wanted: int) -> int:
        """The start of room for `wanted` adjacent blocks, as far into the largest free run as that allows."""
        edges = np.diff(self._free.astype(np.int8), prepend=0, append=0)
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        largest = int(np.argmax(ends - starts))
        start, length = int(starts[largest]), int(ends[largest] - starts[largest])
        if start == 0:  # nothing before the run needs room to grow
            return start
        return start + max(0, min(length // 2, length - wanted))
