"""OpenAI's HTTP API as Tropical speaks it: request bodies in, typed requests out, response shapes back.

Pure functions and plain structs, no I/O: the server (`tropical.gateway.server`)
reads the body and headers, calls `completion_request` / `chat_request` to get
what to publish, and builds each reply with the shape functions here. What the
API allows but Tropical does not do (several prompts or choices, logprobs) is
refused with a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from tropical.protocol import SamplingParams, Slo, Timings, TokenId

# Per-request SLO headers: llm-d's names first, then the reversed spelling other gateways use.
TTFT_HEADERS = ("x-slo-ttft-ms", "x-ttft-slo-ms")
TPOT_HEADERS = ("x-slo-tpot-ms", "x-tpot-slo-ms")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default `max_tokens` for /v1/completions
DEFAULT_CHAT_TOKENS = 256  # chat has no default length in the API; bounded further by the model's context


class ApiError(Exception):
    """An error reply in OpenAI's shape; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


# --- request bodies -------------------------------------------------------------------------

Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Fields both endpoints share (unknown fields are ignored, as OpenAI-compatible servers do)."""

    model: str
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(lt=1 << 31)] | None = None  # vLLM's extension; -1 or 0: no cut
    seed: Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)] | None = None  # a 64-bit integer, as the wire carries it
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    n: Annotated[int, msgspec.Meta(ge=1)] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None
    user: str | None = None
    ttft_slo_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None  # Tropical's: the SLO in the body, beside the headers
    tpot_slo_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None


class CompletionBody(_Common, kw_only=True):
    prompt: str | list[Any]  # text, token ids, or a batch of one of either (checked by `completion_request`)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Common, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]


Body = TypeVar("Body", CompletionBody, ChatBody)


def parse_body(raw: bytes, kind: type[Body]) -> Body:
    """The request body as `kind`, or a 400 saying what is wrong with it (and which field)."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        field = re.search(r"\$\.(\w+)|required field `(\w+)`", str(exc))
        raise bad_request(f"invalid request: {exc}", (field.group(1) or field.group(2)) if field else None) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None


# --- what to publish ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One request to publish, and what the reply needs to know about it."""

    prompt: str | list[int]  # text where the gateway has no tokenizer to count it (the router tokenizes)
    max_tokens: int | None  # None: the gateway bounds it by the model's context once the prompt is counted
    sampling: SamplingParams
    ttft_slo_ms: float | None  # None: the deployment's default
    tpot_slo_ms: float | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    def slo(self, default_ttft_ms: float, default_tpot_ms: float) -> Slo:
        """The request's SLO, the deployment's default for what it does not give."""
        return Slo(ttft_ms=self.ttft_slo_ms or default_ttft_ms, tpot_ms=self.tpot_slo_ms or default_tpot_ms)


def _header_ms(headers: Mapping[str, str], names: Sequence[str]) -> float | None:
    for name in names:
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            raise bad_request(f"header {name} must be a number of milliseconds, not {raw!r}", name) from None
        if not math.isfinite(value) or value <= 0:
            raise bad_request(f"header {name} must be a positive number of milliseconds, not {raw!r}", name)
        return value
    return None


def completion_request(body: CompletionBody, headers: Mapping[str, str]) -> Generation:
    if body.echo or body.suffix is not None or (body.best_of or 1) > 1:
        raise bad_request("echo, suffix and best_of are not supported", "echo" if body.echo else "suffix" if body.suffix else "best_of")
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("one prompt per request: send each prompt as its own request", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise bad_request("the prompt is empty", "prompt")
    if not isinstance(prompt, str) and not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in prompt):
        raise bad_request("the prompt must be a text or a list of token ids (0 to 2**31 - 1)", "prompt")
    return _generation(body, headers, prompt, DEFAULT_COMPLETION_TOKENS)


def chat_request(body: ChatBody, headers: Mapping[str, str], template: Any | None) -> Generation:
    """`template` turns messages into prompt ids (the model's chat template); without one the roles are written out."""
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt: str | list[int]
    if template is not None:
        prompt = list(template(messages))
    else:
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return _generation(body, headers, prompt, None)


def _generation(body: _Common, headers: Mapping[str, str], prompt: str | list[int], default_tokens: int | None) -> Generation:
    if body.n != 1:
        raise bad_request("n must be 1: one choice per request", "n")
    if body.logprobs not in (None, False, 0):
        raise bad_request("logprobs are not supported", "logprobs")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise bad_request("a stop string may not be empty", "stop")
    sampling = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        stop_token_ids=list(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
    )
    options = body.stream_options or {}
    return Generation(
        prompt=prompt,
        max_tokens=body.max_completion_tokens or body.max_tokens or default_tokens,
        sampling=sampling,
        ttft_slo_ms=_header_ms(headers, TTFT_HEADERS) or body.ttft_slo_ms,
        tpot_slo_ms=_header_ms(headers, TPOT_HEADERS) or body.tpot_slo_ms,
        stop=stop,
        stream=body.stream,
        include_usage=bool(options.get("include_usage")),
    )


# --- replies --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """How one response is labelled: its id, kind, model and creation time."""

    id: str
    chat: bool
    model: str
    created: int

    @classmethod
    def new(cls, request_id: str, chat: bool, model: str) -> Reply:
        return cls(("chatcmpl-" if chat else "cmpl-") + request_id, chat, model, int(time.time()))

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created,
                "model": self.model, "choices": choices}

    def chunk(self, text: str, token_ids: Sequence[int], *, first: bool = False, finish_reason: str | None = None,
              timings: Timings | None = None) -> dict[str, Any]:
        """One streamed piece (SSE `data:`); the one with `finish_reason` also carries the request's timings."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "token_ids": list(token_ids)}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice.update(text=text, logprobs=None)
        out = self._envelope([choice], chunk=True)
        if timings is not None:
            out["timings"] = timings_dict(timings)
        return out

    def usage_chunk(self, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
        return {**self._envelope([], chunk=True), "usage": usage(prompt_tokens, output_tokens)}

    def whole(self, text: str, token_ids: Sequence[int], finish_reason: str, prompt_tokens: int,
              timings: Timings | None) -> dict[str, Any]:
        """The non-streamed response."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "token_ids": list(token_ids)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        out = {**self._envelope([choice], chunk=False), "usage": usage(prompt_tokens, len(token_ids))}
        if timings is not None:
            out["timings"] = timings_dict(timings)
        return out


def usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens, "total_tokens": prompt_tokens + output_tokens}


def timings_dict(timings: Timings) -> dict[str, float | None]:
    return msgspec.structs.asdict(timings)


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "tropical"}]}
