"""Anthropic usage: Messages bodies and streams (message_start + cumulative message_delta)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paymaster.core.pricing import ModelPrice, llm_cost
from paymaster.usage import AnthropicStreamReader, Usage, read_json, stream_reader

MODEL = "claude-sonnet-4-5-20250929"

MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [{"type": "text", "text": "Hello!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 21,
        "cache_creation_input_tokens": 188086,
        "cache_read_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 188086, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 393,
        "service_tier": "standard",
    },
}

PRICE = ModelPrice(
    input=3_000_000_000,
    output=15_000_000_000,
    cached_input=300_000_000,
    cache_write=3_750_000_000,
    cache_write_1h=6_000_000_000,
)


def dump(document: Any) -> bytes:
    return json.dumps(document).encode()


def ceil_million(total: int) -> int:
    return -(-total // 1_000_000)


# --------------------------------------------------------------------------- JSON bodies


def test_message_usage_counts_cache_reads_and_writes_in_the_input() -> None:
    usage = read_json("anthropic", dump(MESSAGE))
    assert usage == Usage(
        input_tokens=21 + 188086 + 3000,
        output_tokens=393,
        cached_input_tokens=3000,
        cache_write_tokens=188086,
        model=MODEL,
        service_tier="standard",
    )


def test_message_cost_bills_each_part_once_at_its_own_price() -> None:
    usage = read_json("anthropic", dump(MESSAGE))
    assert usage is not None
    expected = 21 * 3_000_000_000 + 3000 * 300_000_000 + 188086 * 3_750_000_000 + 393 * 15_000_000_000
    assert llm_cost(PRICE, usage) == ceil_million(expected)


def test_one_hour_cache_writes() -> None:
    body = {
        **MESSAGE,
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 3000,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
            "output_tokens": 5,
        },
    }
    usage = read_json("anthropic", dump(body))
    assert usage is not None
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (3010, 3000, 2000)
    expected = 10 * 3_000_000_000 + 1000 * 3_750_000_000 + 2000 * 6_000_000_000 + 5 * 15_000_000_000
    assert llm_cost(PRICE, usage) == ceil_million(expected)


def test_message_without_cache_fields() -> None:
    body = {**MESSAGE, "usage": {"input_tokens": 12, "output_tokens": 6}}
    assert read_json("anthropic", dump(body)) == Usage(12, 6, model=MODEL)
    split_only = {
        **MESSAGE,
        "usage": {
            "input_tokens": 1,
            "output_tokens": 1,
            "cache_creation": {"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 3},
        },
    }
    usage = read_json("anthropic", dump(split_only))
    assert usage is not None
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (6, 5, 3)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        dump({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        dump({**MESSAGE, "usage": None}),
        dump({**MESSAGE, "usage": {"input_tokens": 12}}),
        dump({**MESSAGE, "usage": {"output_tokens": 12}}),
        dump({**MESSAGE, "usage": {"input_tokens": "12", "output_tokens": 6}}),
        dump({"input_tokens": 12}),  # count_tokens: not a usage report
    ],
)
def test_unreadable_usage_is_none_never_zero(body: bytes) -> None:
    assert read_json("anthropic", body) is None


# --------------------------------------------------------------------------- streams


def event(name: str, data: dict[str, Any], newline: str = "\n") -> str:
    return f"event: {name}{newline}data: {json.dumps(data, ensure_ascii=False)}{newline}{newline}"


START = {
    "type": "message_start",
    "message": {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": MODEL,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 25,
            "cache_creation_input_tokens": 1200,
            "cache_read_input_tokens": 3000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 1,
            "service_tier": "standard",
        },
    },
}
BODY_EVENTS: list[tuple[str, dict[str, Any]]] = [
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Grüß dich"}},
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": " — 日本語 🎉 message_"},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
]
DELTA = {
    "type": "message_delta",
    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    "usage": {"output_tokens": 15},
}
STOP = {"type": "message_stop"}


def stream(*events: tuple[str, dict[str, Any]], newline: str = "\n") -> bytes:
    return "".join(event(name, data, newline) for name, data in events).encode()


FULL = stream(("message_start", START), *BODY_EVENTS, ("message_delta", DELTA), ("message_stop", STOP))
EXPECTED = Usage(
    input_tokens=25 + 1200 + 3000,
    output_tokens=15,
    cached_input_tokens=3000,
    cache_write_tokens=1200,
    model=MODEL,
    service_tier="standard",
)


def run(data: bytes, cuts: list[int]) -> tuple[Any, bytes]:
    reader = stream_reader("anthropic")
    out = bytearray()
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += reader.feed(data[start:cut])
        start = cut
    out += reader.close()
    return reader, bytes(out)


def test_stream_usage() -> None:
    reader, out = run(FULL, [])
    assert isinstance(reader, AnthropicStreamReader)
    assert reader.usage == EXPECTED
    assert reader.finished
    assert out == FULL  # Anthropic streams are never altered


def test_stream_fed_byte_by_byte() -> None:
    reader, out = run(FULL, list(range(len(FULL))))
    assert reader.usage == EXPECTED
    assert out == FULL


@given(st.lists(st.integers(min_value=0, max_value=len(FULL)), max_size=40))
def test_stream_in_random_splits(cuts: list[int]) -> None:
    reader, out = run(FULL, cuts)
    assert reader.usage == EXPECTED
    assert reader.finished
    assert out == FULL


@given(st.lists(st.integers(min_value=0, max_value=len(FULL)), max_size=10))
def test_stream_with_crlf(cuts: list[int]) -> None:
    data = stream(
        ("message_start", START),
        *BODY_EVENTS,
        ("message_delta", DELTA),
        ("message_stop", STOP),
        newline="\r\n",
    )
    reader, out = run(data, cuts)
    assert reader.usage == EXPECTED
    assert out == data


@given(st.integers(min_value=0, max_value=len(FULL) - 1))
def test_cut_stream_has_no_usage(length: int) -> None:
    """Cut anywhere before message_stop is complete: no usage (the gateway charges the hold)."""
    stop_line_end = FULL.rindex(b"\n\n")  # the end of message_stop's data line
    reader, _ = run(FULL[:length], [])
    if length < stop_line_end:
        assert reader.usage is None
        assert not reader.finished
    if length < FULL.index(b"event: message_delta") + 40:
        assert reader.partial_usage is None


def test_cut_after_message_delta_keeps_partial_usage() -> None:
    reader, _ = run(FULL[: FULL.index(b"event: message_stop")], [])
    assert reader.usage is None
    assert reader.partial_usage == EXPECTED


def test_message_delta_is_cumulative_and_its_fields_win() -> None:
    """Server tools send several message_delta events, each with running totals (not increments)."""
    first = {"type": "message_delta", "delta": {}, "usage": {"input_tokens": 9000, "output_tokens": 100}}
    last = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {
            "input_tokens": 10682,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 3000,
            "output_tokens": 510,
            "server_tool_use": {"web_search_requests": 1},
        },
    }
    data = stream(
        ("message_start", START),
        *BODY_EVENTS,
        ("message_delta", first),
        ("message_delta", last),
        ("message_stop", STOP),
    )
    reader, _ = run(data, [])
    assert reader.usage == Usage(
        input_tokens=10682 + 0 + 3000,
        output_tokens=510,  # the last running total, not 100 + 510
        cached_input_tokens=3000,
        cache_write_tokens=0,  # the delta's total wins over message_start's (and its TTL split)
        model=MODEL,
        service_tier="standard",
    )


def test_stream_without_message_delta_or_with_an_error() -> None:
    no_delta = stream(("message_start", START), *BODY_EVENTS, ("message_stop", STOP))
    reader, _ = run(no_delta, [])
    assert reader.finished
    assert reader.usage is None  # message_start's output_tokens is a placeholder, not a count
    error = stream(
        ("message_start", START),
        *BODY_EVENTS[:2],
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
    reader, out = run(error, [5, 77])
    assert reader.usage is None
    assert not reader.finished
    assert out == error


def test_withhold_flag_never_alters_anthropic_streams() -> None:
    reader = stream_reader("anthropic", withhold_usage_chunk=True)
    assert reader.feed(FULL) + reader.close() == FULL
    assert reader.usage == EXPECTED
