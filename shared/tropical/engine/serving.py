"""What every engine offers a worker: requests in, planned steps, KV handoffs, capacity.

The model engine and the emulated engine are this interface over the same
bookkeeping; each adds only how a step is computed and what its KV is made of.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

from tropical.engine.bookkeeping import Bookkeeping, InvalidRequest
from tropical.engine.kv_transfer import KvExport
from tropical.engine.plan import EnginePlan, StepResult
from tropical.engine.sequence import SequenceState
from tropical.protocol import FinishReason, SamplingParams


class ServingEngine(ABC):
    book: Bookkeeping

    # --- requests ---------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Iterable[int],
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        *,
        retain_kv: bool = False,
        output_token_ids: Iterable[int] = (),
    ) -> None:
        """Queue a request; `retain_kv` keeps its blocks after it finishes, for `export_kv`, until `abort`.

        `output_token_ids`: the answer's tokens so far (a request resumed elsewhere); it continues after them, the
        sampler counting its output positions from there, and `max_tokens` counts them too.
        """
        self.book.add(request_id, list(prompt), sampling or SamplingParams(), max_tokens, retain_kv, list(output_token_ids))

    def ended(self, output_token_ids: Iterable[int], sampling: SamplingParams, max_tokens: int) -> FinishReason | None:
        """Why an answer of these tokens is over already (its last a stop token, or `max_tokens` of them); None: it goes on."""
        return self.book.ended(list(output_token_ids), sampling, max_tokens)

    def abort(self, request_id: str) -> bool:
        """Forget a request in any state and free its blocks: a cancel, or the end of an export's lease."""
        return self.book.abort(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is queued or holds KV unfinished (decodes kept waiting included)."""
        return self.book.has_unfinished()

    def sequence(self, request_id: str) -> SequenceState | None:
        """Where a request stands: its status, tokens computed and pending, and its KV; None if unknown."""
        return self.book.state(request_id)

    # --- stepping ---------------------------------------------------------------------

    @abstractmethod
    def step(self, plan: EnginePlan | None = None, *, with_logits: bool = False) -> StepResult:
        """Run exactly `plan` (the default FCFS planner's when None); `PlanRefused` changes nothing."""

    # --- KV handoff -------------------------------------------------------------------

    @property
    @abstractmethod
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, KV heads, head dim) of this engine's KV: an import must match it."""

    @abstractmethod
    def _read_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Token-major keys and values of the first `num_tokens` tokens in these blocks."""

    @abstractmethod
    def _write_kv(self, block_table: list[int], data: torch.Tensor) -> None:
        """Store token-major keys and values into these blocks."""

    def export_kv(self, request_id: str, *, to_host: bool = True) -> KvExport:
        """A copy of a request's computed KV (on the host, or on this device for CUDA IPC) and its tokens."""
        seq = self.book.exportable(request_id)
        data = self._read_kv(seq.block_table, seq.num_computed)
        return KvExport(
            request_id=request_id,
            prompt_token_ids=seq.token_ids[: seq.prompt_len],
            output_token_ids=seq.output_token_ids,
            sampling=seq.sampling,
            max_tokens=seq.max_tokens,
            block_size=self.book.blocks.block_size,
            data=data.cpu() if to_host else data,
        )

    def import_kv(self, kv: KvExport, *, request_id: str | None = None) -> None:
        """Continue another engine's sequence here: fresh blocks, its KV copied in; it waits for a decode."""
        layout = kv.layout
        theirs = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        if theirs != self.kv_shape:
            raise InvalidRequest(f"KV of (layers, kv heads, head dim) = {theirs} does not fit this engine's {self.kv_shape}")
        request_id = request_id or kv.request_id
        seq = self.book.add_imported(
            request_id, kv.prompt_token_ids, kv.output_token_ids, kv.sampling, kv.max_tokens, kv.num_tokens
        )
        try:
            self._write_kv(seq.block_table, kv.data)
        except BaseException:
            self.book.abort(request_id)
            raise

    # --- capacity ---------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        return self.book.kv_capacity_tokens

    @property
    def kv_free_tokens(self) -> int:
        return self.book.kv_free_tokens

    @property
    def kv_block_size(self) -> int:
        """Tokens per KV block: a sequence holds whole blocks."""
        return self.book.blocks.block_size

    @property
    def max_model_len(self) -> int:
        """The longest prompt + max_tokens a request may ask for."""
        return self.book.limits.max_model_len
