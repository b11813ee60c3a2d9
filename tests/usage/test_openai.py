"""OpenAI usage: JSON bodies, Chat Completions and Responses streams, the usage chunk; cost headers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paymaster.core.pricing import ModelPrice, llm_cost
from paymaster.errors import InvalidRequest
from paymaster.usage import (
    Usage,
    ensure_openai_stream_usage,
    is_usage_only_chunk,
    read_cost_header,
    read_json,
    stream_reader,
)

CHAT_COMPLETION = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I assist you today?",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

RESPONSE = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "model": "o3-2025-04-16",
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Four.", "annotations": []}],
        },
    ],
    "usage": {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 128},
        "output_tokens": 1152,
        "output_tokens_details": {"reasoning_tokens": 1088},
        "total_tokens": 1480,
    },
    "service_tier": "priority",
}

EMBEDDING = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, -0.0028842222]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


def dump(document: Any) -> bytes:
    return json.dumps(document).encode()


# --------------------------------------------------------------------------- JSON bodies


def test_chat_completion_usage() -> None:
    usage = read_json("openai", dump(CHAT_COMPLETION))
    assert usage == Usage(
        input_tokens=1117,
        output_tokens=46,
        cached_input_tokens=1024,
        reasoning_tokens=0,
        model="gpt-4o-2024-08-06",
        service_tier="default",
    )


def test_responses_api_usage() -> None:
    usage = read_json("openai", dump(RESPONSE))
    assert usage == Usage(
        input_tokens=328,
        output_tokens=1152,
        cached_input_tokens=128,
        reasoning_tokens=1088,
        model="o3-2025-04-16",
        service_tier="priority",
    )


def test_embeddings_usage_has_no_output() -> None:
    usage = read_json("openai", dump(EMBEDDING))
    assert usage == Usage(input_tokens=8, output_tokens=0, model="text-embedding-3-small")


def test_legacy_completion_and_null_details() -> None:
    body = {
        "object": "text_completion",
        "model": "gpt-3.5-turbo-instruct",
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 7,
            "total_tokens": 12,
            "prompt_tokens_details": None,
        },
    }
    assert read_json("openai", dump(body)) == Usage(5, 7, model="gpt-3.5-turbo-instruct")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"truncated": ',
        b"[]",
        dump({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
        dump({**CHAT_COMPLETION, "usage": None}),
        dump({**CHAT_COMPLETION, "usage": {"prompt_tokens": -1, "completion_tokens": 1}}),
        dump({**CHAT_COMPLETION, "usage": {"prompt_tokens": 1.5, "completion_tokens": 1}}),
        dump({**CHAT_COMPLETION, "usage": {"prompt_tokens": 10, "completion_tokens": "7"}}),
        dump({**CHAT_COMPLETION, "usage": {"prompt_tokens": 10}}),
        dump({**RESPONSE, "usage": {"input_tokens": 10}}),
        dump({**RESPONSE, "usage": {"total_tokens": 10}}),
        b'\xff\xfe{"usage"',
    ],
)
def test_unreadable_usage_is_none_never_zero(body: bytes) -> None:
    assert read_json("openai", body) is None


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        read_json("header:x-cost", b"{}")
    with pytest.raises(ValueError):
        stream_reader("flat")


def test_cost_of_a_chat_completion_bills_cached_tokens_once() -> None:
    usage = read_json("openai", dump(CHAT_COMPLETION))
    assert usage is not None
    price = ModelPrice(input=2_500_000_000, output=10_000_000_000, cached_input=1_250_000_000)
    exact = 93 * 2_500_000_000 + 1024 * 1_250_000_000 + 46 * 10_000_000_000
    assert exact % 1_000_000 == 0
    assert llm_cost(price, usage) == exact // 1_000_000


# --------------------------------------------------------------------------- streams


def sse(*events: Any, newline: str = "\n") -> bytes:
    parts = []
    for event in events:
        if isinstance(event, tuple):
            name, data = event
            parts.append(
                f"event: {name}{newline}data: {json.dumps(data, ensure_ascii=False)}{newline}{newline}"
            )
        elif event == "[DONE]":
            parts.append(f"data: [DONE]{newline}{newline}")
        elif isinstance(event, str):
            parts.append(event)
        else:
            parts.append(
                f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}{newline}{newline}"
            )
    return "".join(parts).encode()


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-AyPQ8",
        "object": "chat.completion.chunk",
        "created": 1738960412,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_72ed7ab54c",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


USAGE_CHUNK = {
    "id": "chatcmpl-AyPQ8",
    "object": "chat.completion.chunk",
    "created": 1738960412,
    "model": "gpt-4o-mini-2024-07-18",
    "service_tier": "default",
    "system_fingerprint": "fp_72ed7ab54c",
    "choices": [],
    "usage": {
        "prompt_tokens": 11,
        "completion_tokens": 9,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
}

HEAD = [
    chunk({"role": "assistant", "content": "", "refusal": None}, usage=None),
    chunk({"content": "Grüß "}, usage=None),
    chunk({"content": "dich — 日本語 🎉"}, usage=None),
    ": keep-alive\n\n",
    chunk({}, "stop", usage=None),
]
CHAT_STREAM = sse(*HEAD, USAGE_CHUNK, "[DONE]")
CHAT_STREAM_WITHOUT_USAGE = sse(*HEAD, "[DONE]")
EXPECTED = Usage(input_tokens=11, output_tokens=9, model="gpt-4o-mini-2024-07-18", service_tier="default")


def run(stream: bytes, cuts: list[int], kind: str = "openai", withhold: bool = False) -> tuple[Any, bytes]:
    reader = stream_reader(kind, withhold_usage_chunk=withhold)
    out = bytearray()
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        out += reader.feed(stream[start:cut])
        start = cut
    out += reader.close()
    return reader, bytes(out)


def test_chat_stream_usage_from_the_last_chunk() -> None:
    reader, out = run(CHAT_STREAM, [])
    assert reader.usage == EXPECTED
    assert reader.finished
    assert out == CHAT_STREAM


def test_chat_stream_fed_byte_by_byte() -> None:
    reader, out = run(CHAT_STREAM, list(range(len(CHAT_STREAM))))
    assert reader.usage == EXPECTED
    assert reader.finished
    assert out == CHAT_STREAM
    withheld_reader, withheld = run(CHAT_STREAM, list(range(len(CHAT_STREAM))), withhold=True)
    assert withheld_reader.usage == EXPECTED
    assert withheld == CHAT_STREAM_WITHOUT_USAGE


@given(st.lists(st.integers(min_value=0, max_value=len(CHAT_STREAM)), max_size=40), st.booleans())
def test_chat_stream_in_random_splits(cuts: list[int], withhold: bool) -> None:
    reader, out = run(CHAT_STREAM, cuts, withhold=withhold)
    assert reader.usage == EXPECTED
    assert reader.finished
    assert out == (CHAT_STREAM_WITHOUT_USAGE if withhold else CHAT_STREAM)


@given(
    st.lists(st.integers(min_value=0, max_value=len(CHAT_STREAM)), max_size=10),
    st.sampled_from(["\r\n", "\r"]),
)
def test_chat_stream_with_crlf_or_cr_line_ends(cuts: list[int], newline: str) -> None:
    stream = sse(*[h for h in HEAD if isinstance(h, dict)], USAGE_CHUNK, "[DONE]", newline=newline)
    expected = sse(*[h for h in HEAD if isinstance(h, dict)], "[DONE]", newline=newline)
    reader, out = run(stream, [c for c in cuts if c <= len(stream)], withhold=True)
    assert reader.usage == EXPECTED
    assert out == expected


def test_crlf_split_after_the_withheld_usage_chunk() -> None:
    stream = sse(*[h for h in HEAD if isinstance(h, dict)], USAGE_CHUNK, "[DONE]", newline="\r\n")
    expected = sse(*[h for h in HEAD if isinstance(h, dict)], "[DONE]", newline="\r\n")
    usage_end = stream.index(b"data: [DONE]")
    for cut in (usage_end - 1, usage_end - 3):  # between the CR and LF of the blank line / of the data line
        reader, out = run(stream, [cut], withhold=True)
        assert out == expected, cut
        assert reader.usage == EXPECTED


def test_withheld_stream_keeps_every_other_event_whole() -> None:
    reader = stream_reader("openai", withhold_usage_chunk=True)
    first = reader.feed(CHAT_STREAM[:10])
    assert first == b""  # an event is forwarded only once it is complete
    rest = reader.feed(CHAT_STREAM[10:]) + reader.close()
    assert first + rest == CHAT_STREAM_WITHOUT_USAGE
    assert rest.startswith(b"data: {")


@given(st.integers(min_value=0, max_value=len(CHAT_STREAM)))
def test_cut_stream(length: int) -> None:
    """A stream cut anywhere before the usage chunk is complete has no usage."""
    usage_end = CHAT_STREAM.index(b"data: [DONE]")
    usage_line_end = usage_end - 2  # "...}}\n\n": the JSON is complete once its line is
    reader, _ = run(CHAT_STREAM[:length], [])
    if length < usage_line_end:
        assert reader.usage is None
    else:
        assert reader.usage == EXPECTED
    assert reader.finished == (length >= len(CHAT_STREAM) - 2)


def test_stream_without_include_usage_has_no_usage() -> None:
    reader, out = run(CHAT_STREAM_WITHOUT_USAGE, [7, 99], withhold=True)
    assert reader.usage is None
    assert reader.finished
    assert out == CHAT_STREAM_WITHOUT_USAGE


def test_azure_prompt_filter_chunk_is_not_withheld() -> None:
    azure_first = {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
    }
    stream = sse(azure_first, *HEAD, USAGE_CHUNK, "[DONE]")
    reader, out = run(stream, [3, 50, 400], withhold=True)
    assert out == sse(azure_first, *HEAD, "[DONE]")
    assert reader.usage == EXPECTED


def test_usage_in_a_chunk_with_choices_is_read_and_forwarded() -> None:
    last = chunk({}, "stop", usage=USAGE_CHUNK["usage"])
    stream = sse(*HEAD[:3], last, "[DONE]")
    reader, out = run(stream, [], withhold=True)
    assert out == stream
    assert reader.usage == EXPECTED


def test_is_usage_only_chunk() -> None:
    assert is_usage_only_chunk(USAGE_CHUNK)
    assert is_usage_only_chunk(json.dumps(USAGE_CHUNK).encode())
    assert is_usage_only_chunk(json.dumps(USAGE_CHUNK))
    assert not is_usage_only_chunk(chunk({"content": "x"}, usage=None))
    assert not is_usage_only_chunk({"choices": [], "usage": None})
    assert not is_usage_only_chunk(b"[DONE]")
    assert not is_usage_only_chunk(b"{")


def test_oversized_event_is_passed_through_unread() -> None:
    big = chunk({"content": "x" * 5000}, usage=None)
    stream = sse(big, USAGE_CHUNK, "[DONE]")
    reader = stream_reader("openai", withhold_usage_chunk=True, max_event_bytes=1000)
    out = b"".join(reader.feed(stream[i : i + 100]) for i in range(0, len(stream), 100)) + reader.close()
    assert out == sse(big, "[DONE]")
    assert reader.usage == EXPECTED
    tiny = stream_reader("openai", withhold_usage_chunk=True, max_event_bytes=100)
    out = tiny.feed(stream) + tiny.close()
    assert out == stream  # too big to hold back or read: forwarded whole, usage unknown
    assert tiny.usage is None


RESPONSES_STREAM = sse(
    (
        "response.created",
        {
            "type": "response.created",
            "sequence_number": 0,
            "response": {**RESPONSE, "status": "in_progress", "output": [], "usage": None},
        },
    ),
    (
        "response.output_text.delta",
        {
            "type": "response.output_text.delta",
            "sequence_number": 5,
            "item_id": "msg_1",
            "output_index": 1,
            "content_index": 0,
            "delta": 'Four. {"usage": {"input_tokens": 1, "output_tokens": 1}}',
        },
    ),
    ("response.completed", {"type": "response.completed", "sequence_number": 9, "response": RESPONSE}),
)


@given(st.lists(st.integers(min_value=0, max_value=len(RESPONSES_STREAM)), max_size=30))
def test_responses_stream_usage_from_response_completed(cuts: list[int]) -> None:
    reader, out = run(RESPONSES_STREAM, cuts, withhold=True)
    assert reader.usage == read_json("openai", dump(RESPONSE))
    assert reader.finished
    assert out == RESPONSES_STREAM


def test_responses_stream_incomplete_carries_usage_and_cut_has_none() -> None:
    incomplete = {**RESPONSE, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    stream = RESPONSES_STREAM.split(b"event: response.completed")[0] + sse(
        ("response.incomplete", {"type": "response.incomplete", "sequence_number": 9, "response": incomplete})
    )
    reader, _ = run(stream, [])
    assert reader.usage is not None and reader.usage.output_tokens == 1152
    assert reader.finished
    cut, _ = run(RESPONSES_STREAM[: RESPONSES_STREAM.index(b"event: response.completed") + 60], [])
    assert cut.usage is None
    assert not cut.finished


# --------------------------------------------------------------------------- stream_options


def test_ensure_stream_usage_sets_include_usage_without_mutating() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [],
        "stream": True,
        "stream_options": {"include_obfuscation": False},
    }
    patched, asked = ensure_openai_stream_usage(body)
    assert not asked
    assert patched["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert body["stream_options"] == {"include_obfuscation": False}
    bare, asked = ensure_openai_stream_usage({"model": "gpt-4o", "messages": [], "stream": True})
    assert not asked and bare["stream_options"] == {"include_usage": True}
    refused, asked = ensure_openai_stream_usage(
        {"messages": [], "stream": True, "stream_options": {"include_usage": False}}
    )
    assert not asked and refused["stream_options"] == {"include_usage": True}


def test_ensure_stream_usage_leaves_what_needs_nothing() -> None:
    own = {"model": "gpt-4o", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    assert ensure_openai_stream_usage(own) == (own, True)
    plain = {"model": "gpt-4o", "messages": []}
    assert ensure_openai_stream_usage(plain) == (plain, True)
    responses = {"model": "o3", "input": "hi", "stream": True}
    assert ensure_openai_stream_usage(responses) == (responses, True)
    assert ensure_openai_stream_usage(responses, path="v1/responses") == (responses, True)
    legacy = {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True}
    assert ensure_openai_stream_usage(legacy, path="v1/completions")[1] is False
    with pytest.raises(InvalidRequest):
        ensure_openai_stream_usage({"messages": [], "stream": True, "stream_options": "yes"})


# --------------------------------------------------------------------------- usage = "header:NAME"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0123", 12_300_000),
        ("2", 2_000_000_000),
        ("0.0000000001", 1),  # below a nano: rounded up
        ("0.12 USD", 120_000_000),
        ("USD 0.12", 120_000_000),
        (" 0.5 ", 500_000_000),
        ("0.12 EUR", None),
        ("-0.1", None),
        ("1e-3", None),
        ("0,12", None),
        ("0.1, 0.2", None),
        ("NaN", None),
        ("\u0663", None),  # ARABIC-INDIC DIGIT THREE
        ("", None),
        ("1" * 200, None),
    ],
)
def test_read_cost_header(value: str, expected: int | None) -> None:
    assert read_cost_header({"X-Cost": value}, "x-cost", "USD") == expected


def test_read_cost_header_absent() -> None:
    assert read_cost_header({}, "x-cost", "USD") is None
    assert read_cost_header({"x-cost": "0.5"}, "X-Cost", "USD") == 500_000_000
