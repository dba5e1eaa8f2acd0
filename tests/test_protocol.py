"""The wire protocol: every message round-trips, and bad input is refused with the right reason."""

from __future__ import annotations

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tropical.protocol import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    ErrorCode,
    GenerateRequest,
    InvalidMessage,
    MalformedMessage,
    Message,
    MessageTooLarge,
    ProtocolError,
    SamplingParams,
    UnknownMessageType,
    UnsupportedVersion,
    decode,
    encode,
    request_id_of,
)
from tests.messages import EXAMPLES, generate_request


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.__struct_config__.tag)
def test_every_message_round_trips(message: Message) -> None:
    assert decode(encode(message)) == message


def test_examples_cover_every_message_type() -> None:
    assert {m.__struct_config__.tag for m in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.__struct_config__.tag)
def test_wire_format_is_plain_msgpack(message: Message) -> None:
    """Any msgpack library reads our messages: a map with the envelope fields and no extension types."""
    plain = msgpack.unpackb(encode(message), strict_map_key=True)
    assert plain["v"] == SCHEMA_VERSION
    assert plain["type"] == message.__struct_config__.tag
    assert decode(msgpack.packb(plain)) == message


def test_a_client_in_another_language_can_build_a_request() -> None:
    raw = msgpack.packb(
        {"v": 1, "type": "generate", "request_id": "r", "prompt_token_ids": [1, 2, 3], "arrival_time": 1.5, "reply_to": "q"}
    )
    message = decode(raw)
    assert isinstance(message, GenerateRequest)
    assert message.prompt_token_ids == [1, 2, 3]
    assert message.sampling == SamplingParams()
    assert message.max_tokens == 256


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    plain = msgpack.unpackb(encode(generate_request()))
    plain["added_in_a_later_minor_release"] = {"x": 1}
    assert decode(msgpack.packb(plain)) == generate_request()


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (b"", MalformedMessage, ErrorCode.MALFORMED),
        (b"\xc1", MalformedMessage, ErrorCode.MALFORMED),
        (b"\x93\x01\x02\x03", MalformedMessage, ErrorCode.MALFORMED),
        (msgpack.packb({"type": "generate"}), MalformedMessage, ErrorCode.MALFORMED),
        (msgpack.packb({"v": "1", "type": "generate"}), MalformedMessage, ErrorCode.MALFORMED),
        (msgpack.packb({"v": 2, "type": "generate"}), UnsupportedVersion, ErrorCode.UNSUPPORTED_VERSION),
        (msgpack.packb({"v": 1, "type": "launch_missiles"}), UnknownMessageType, ErrorCode.UNKNOWN_TYPE),
        (msgpack.packb({"v": 1, "type": "generate"}), InvalidMessage, ErrorCode.INVALID),
        (encode(generate_request())[:-3], MalformedMessage, ErrorCode.MALFORMED),
    ],
    ids=["empty", "bad-opcode", "array", "no-version", "version-type", "future-version", "unknown-type", "missing-fields", "truncated"],
)
def test_bad_input_is_refused_with_its_reason(data: bytes, error: type[ProtocolError], code: ErrorCode) -> None:
    with pytest.raises(error) as caught:
        decode(data)
    assert caught.value.code == code


def field_override(**fields: object) -> bytes:
    plain = msgpack.unpackb(encode(generate_request()))
    plain.update(fields)
    return msgpack.packb(plain)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"prompt": None}, "exactly one"),
        ({"prompt_token_ids": [1, 2]}, "exactly one"),
        ({"prompt": ""}, "empty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": None, "prompt_token_ids": [-1]}, "prompt_token_ids"),
        ({"sampling": {"top_p": 0}}, "top_p"),
        ({"sampling": {"temperature": -1}}, "temperature"),
        ({"slo": {"ttft_ms": 0, "tpot_ms": 50}}, "ttft_ms"),
        ({"request_id": ""}, "request_id"),
        ({"reply_to": 7}, "reply_to"),
    ],
)
def test_invalid_fields_name_the_problem(fields: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidMessage, match=says):
        decode(field_override(**fields))


def test_oversized_payload_is_refused_before_parsing() -> None:
    data = encode(generate_request(prompt="x" * 5000))
    assert decode(data, max_bytes=len(data)) == generate_request(prompt="x" * 5000)
    with pytest.raises(MessageTooLarge):
        decode(data, max_bytes=len(data) - 1)


def test_constructing_an_invalid_request_in_code_fails_too() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        GenerateRequest(request_id="r", arrival_time=0.0, reply_to="q")


def test_messages_are_immutable() -> None:
    with pytest.raises(AttributeError):
        generate_request().max_tokens = 3  # type: ignore[misc]


def test_request_id_of_nested_messages() -> None:
    by_tag = {m.__struct_config__.tag: request_id_of(m) for m in EXAMPLES}
    assert by_tag["dispatch"] == by_tag["kv_handoff"] == "req-1"
    assert by_tag["worker_status"] is None


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


def mutated_messages() -> st.SearchStrategy[bytes]:
    """Valid messages with one field replaced by an arbitrary value: the shapes most likely to slip through."""

    def mutate(message: Message, data: st.DataObject) -> bytes:
        plain = msgpack.unpackb(encode(message))
        field = data.draw(st.sampled_from(sorted(plain)))
        plain[field] = data.draw(msgpack_values)
        return msgpack.packb(plain)

    return st.builds(mutate, st.sampled_from(EXAMPLES), st.data())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | msgpack_values.map(msgpack.packb) | mutated_messages())
def test_decoder_accepts_or_refuses_but_never_crashes(data: bytes) -> None:
    try:
        message = decode(data)
    except ProtocolError as exc:
        assert exc.code in ErrorCode
        assert str(exc)
    else:
        assert isinstance(message, Message)
        assert decode(encode(message)) == message


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        generate_request,
        prompt=st.text(min_size=1, max_size=50),
        max_tokens=st.integers(1, 1 << 20),
        sampling=st.builds(
            SamplingParams,
            temperature=st.floats(0, 100),
            top_p=st.floats(0, 1, exclude_min=True),
            top_k=st.integers(0, 1000),
            seed=st.none() | st.integers(-(2**63), 2**63 - 1),
            stop_token_ids=st.lists(st.integers(0, 2**31 - 1), max_size=4),
        ),
    )
)
def test_valid_requests_round_trip(message: GenerateRequest) -> None:
    assert decode(encode(message)) == message
    assert msgspec.msgpack.decode(encode(message), type=GenerateRequest) == message
