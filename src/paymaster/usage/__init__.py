"""Reading the actual usage of a call from the provider's response (JSON body or SSE stream).

``read_json(kind, body)`` for a whole body; ``stream_reader(kind, ...)`` for a stream, fed the
raw bytes as they arrive. Unreadable or absent usage is None, never zero: the gateway then
charges the hold, flagged ``estimated``.
"""

from __future__ import annotations

from paymaster.usage.anthropic import AnthropicStreamReader, parse_anthropic_usage, read_anthropic_json
from paymaster.usage.base import DEFAULT_MAX_EVENT_BYTES, SseUsageReader, Usage, loads
from paymaster.usage.header import read_cost_header
from paymaster.usage.openai import (
    OpenAIStreamReader,
    ensure_openai_stream_usage,
    is_usage_only_chunk,
    parse_openai_usage,
    read_openai_json,
)

__all__ = [
    "KINDS",
    "AnthropicStreamReader",
    "OpenAIStreamReader",
    "SseUsageReader",
    "Usage",
    "ensure_openai_stream_usage",
    "is_usage_only_chunk",
    "parse_anthropic_usage",
    "parse_openai_usage",
    "read_cost_header",
    "read_json",
    "stream_reader",
]

KINDS = ("openai", "anthropic")
"""The ``usage`` kinds read from the response body; ``header:NAME`` and ``flat`` are not."""


def read_json(kind: str, body: bytes) -> Usage | None:
    """Usage of a whole JSON response body of provider ``kind`` (``openai`` or ``anthropic``)."""
    if kind == "openai":
        return read_openai_json(loads(body))
    if kind == "anthropic":
        return read_anthropic_json(loads(body))
    raise ValueError(f"no JSON usage reader for {kind!r}; known: {', '.join(KINDS)}")


def stream_reader(
    kind: str, *, withhold_usage_chunk: bool = False, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> SseUsageReader:
    """A fresh incremental reader for an SSE stream of provider ``kind``.

    ``withhold_usage_chunk`` (OpenAI only; see :func:`ensure_openai_stream_usage`) drops the
    usage-only chunk from what ``feed`` returns; Anthropic streams are never altered.
    """
    if kind == "openai":
        return OpenAIStreamReader(withhold_usage_chunk=withhold_usage_chunk, max_event_bytes=max_event_bytes)
    if kind == "anthropic":
        return AnthropicStreamReader(max_event_bytes=max_event_bytes)
    raise ValueError(f"no stream usage reader for {kind!r}; known: {', '.join(KINDS)}")
