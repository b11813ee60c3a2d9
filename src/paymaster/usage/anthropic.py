"""Anthropic Messages usage.

Anthropic's ``usage.input_tokens`` EXCLUDES cache reads (``cache_read_input_tokens``) and cache
writes (``cache_creation_input_tokens``); :class:`~paymaster.usage.base.Usage` counts every
input token in ``input_tokens``, so the three are added, and the cache parts are kept apart for
their own prices. Thinking tokens are part of ``output_tokens``.

Streams: ``message_start.message.usage`` seeds the input (and cache) counts; every
``message_delta.usage`` is cumulative (server tools can send several), so the last one wins and
its fields win over the start's. The usage is final only at ``message_stop``; a stream cut before
it has no usage (``partial_usage`` still tells what was seen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from paymaster.usage.base import SseUsageReader, Usage, count, loads, optional_count, text_or_none

__all__ = ["AnthropicStreamReader", "parse_anthropic_usage", "read_anthropic_json"]

_EVENTS: Final = frozenset({"message_start", "message_delta", "message_stop"})


def parse_anthropic_usage(usage: Any, *, model: Any = None) -> Usage | None:
    """Normalise an Anthropic ``usage`` object; None when it is absent or unreadable."""
    if not isinstance(usage, Mapping):
        return None
    uncached = count(usage.get("input_tokens"))
    output_tokens = count(usage.get("output_tokens"))
    if uncached is None or output_tokens is None:
        return None
    reads = optional_count(usage, "cache_read_input_tokens")
    writes_5m = optional_count(usage, "cache_creation", "ephemeral_5m_input_tokens")
    writes_1h = optional_count(usage, "cache_creation", "ephemeral_1h_input_tokens")
    # The total is authoritative (a stream's message_delta updates it, not the TTL split).
    total_writes = count(usage.get("cache_creation_input_tokens"))
    writes = total_writes if total_writes is not None else writes_5m + writes_1h
    thinking = optional_count(usage, "output_tokens_details", "thinking_tokens")
    return Usage(
        input_tokens=uncached + reads + writes,
        output_tokens=output_tokens,
        cached_input_tokens=reads,
        cache_write_tokens=writes,
        reasoning_tokens=min(thinking, output_tokens),
        model=text_or_none(model),
        cache_write_1h_tokens=min(writes_1h, writes),
        service_tier=text_or_none(usage.get("service_tier")),
    )


def read_anthropic_json(document: Any) -> Usage | None:
    """Usage of a (non-streamed) Anthropic Messages response body already parsed from JSON."""
    if not isinstance(document, Mapping):
        return None
    return parse_anthropic_usage(document.get("usage"), model=document.get("model"))


def _merge(start: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """``start`` overlaid with every non-null field of ``delta`` (one level into nested objects)."""
    merged = dict(start)
    for key, value in delta.items():
        if value is None:
            continue
        previous = merged.get(key)
        if isinstance(value, Mapping) and isinstance(previous, Mapping):
            merged[key] = _merge(previous, value)
        else:
            merged[key] = value
    return merged


class AnthropicStreamReader(SseUsageReader):
    """Usage of an Anthropic Messages stream; never withholds an event."""

    kind = "anthropic"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model: str | None = None
        self._start: dict[str, Any] | None = None
        self._delta: dict[str, Any] | None = None

    @property
    def usage(self) -> Usage | None:
        """The final usage: only once ``message_stop`` arrived after a ``message_delta``."""
        return self.partial_usage if self._finished else None

    @property
    def partial_usage(self) -> Usage | None:
        """The usage as of the last ``message_delta`` seen, final or not."""
        if self._delta is None:
            return None
        return parse_anthropic_usage(_merge(self._start or {}, self._delta), model=self.model)

    def _on_event(self, event: str, data: bytes) -> bool:
        if event:
            if event not in _EVENTS:
                return True
        elif b'"message_' not in data:
            return True
        document = loads(data)
        if not isinstance(document, Mapping):
            return True
        kind = document.get("type")
        if kind == "message_start":
            message = document.get("message")
            if isinstance(message, Mapping):
                usage = message.get("usage")
                self._start = dict(usage) if isinstance(usage, Mapping) else {}
                self.model = text_or_none(message.get("model"))
        elif kind == "message_delta":
            usage = document.get("usage")
            if isinstance(usage, Mapping):
                self._delta = _merge(self._delta or {}, usage)
        elif kind == "message_stop":
            self._finished = True
        return True
