"""The normalised usage record and an incremental server-sent-events reader.

:class:`SseUsageReader` is fed the upstream's raw bytes as they arrive, split anywhere (mid-line,
mid-UTF-8 character), and hands back the bytes to pass on to the client. It keeps at most one
event in memory (bounded by ``max_event_bytes``), never the stream. By default it passes every
chunk through at once; with ``withhold_usage_chunk`` it forwards whole events only, so that a
provider reader can drop one (OpenAI's usage-only chunk) while event boundaries stay intact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "SseUsageReader",
    "Usage",
    "count",
    "loads",
    "optional_count",
    "text_or_none",
]

DEFAULT_MAX_EVENT_BYTES: Final = 32 * 1024 * 1024
"""Events larger than this are passed through unread (their usage, if any, is lost: charged at the hold)."""

_EOL = re.compile(rb"[\r\n]")
_CR: Final = 0x0D
_LF: Final = 0x0A
_COLON: Final = 0x3A


@dataclass
class Usage:
    """Token usage of one call, normalised across providers.

    ``input_tokens`` always includes the cached (``cached_input_tokens``) and cache-write
    (``cache_write_tokens``) tokens; ``output_tokens`` always includes ``reasoning_tokens``.
    ``cache_write_1h_tokens`` is the part of the cache writes made with a one-hour TTL (Anthropic
    bills them dearer); ``service_tier`` is the tier the provider says it served the call on.
    """

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    cache_write_1h_tokens: int = 0
    service_tier: str | None = None


def count(value: Any) -> int | None:
    """A token count: a non-negative JSON integer, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def optional_count(mapping: Any, *path: str) -> int:
    """A nested optional token count; 0 when absent, null or not a count."""
    value: Any = mapping
    for key in path:
        if not isinstance(value, Mapping):
            return 0
        value = value.get(key)
    return count(value) or 0


def loads(data: bytes | str) -> Any:
    """JSON, or None when the text is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class SseUsageReader:
    """Reads usage from a server-sent-events stream on the side, without buffering the stream.

    Subclasses implement :meth:`_on_event`; use :func:`paymaster.usage.stream_reader` to get one.
    ``feed`` returns the bytes to forward now; ``close`` returns whatever was still held when the
    upstream ended. ``usage`` is None until the provider has reported the call's final usage (a
    stream cut before that stays None); ``finished`` tells whether the stream ended normally.
    """

    kind: str = ""

    def __init__(self, *, withhold_usage_chunk: bool = False, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES):
        self.withhold_usage_chunk = withhold_usage_chunk
        self.max_event_bytes = max_event_bytes
        self._usage: Usage | None = None
        self._finished = False
        self._closed = False
        # Parser state: the current line, the current event's fields, the pending CR of a CRLF.
        self._line = bytearray()
        self._line_too_long = False
        self._pending_cr = False
        self._cr_ended_event: bool | None = None
        self._event_name = ""
        self._data: list[bytes] = []
        self._data_size = 0
        self._has_data = False
        self._skip_event = False
        # Raw bytes of the current event not yet forwarded (withholding mode only).
        self._held = bytearray()
        self._event_partly_sent = False
        self.events = 0

    # -- public

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, chunk: bytes) -> bytes:
        """Read ``chunk`` and return the bytes to forward to the client now."""
        if not chunk or self._closed:
            return b""
        withhold = self.withhold_usage_chunk
        out = bytearray()
        size = len(chunk)
        pos = 0
        sent_upto = 0
        if self._pending_cr:
            self._pending_cr = False
            if chunk[0] == _LF:  # the rest of a CRLF split between chunks
                pos = 1
                if withhold and self._cr_ended_event is not None:
                    if self._cr_ended_event:
                        out += b"\n"
                    sent_upto = 1
        while pos < size:
            match = _EOL.search(chunk, pos)
            if match is None:
                self._extend_line(chunk[pos:])
                break
            end = match.start()
            self._extend_line(chunk[pos:end])
            if chunk[end] == _CR:
                if end + 1 < size:
                    pos = end + 2 if chunk[end + 1] == _LF else end + 1
                else:
                    self._pending_cr = True
                    pos = end + 1
            else:
                pos = end + 1
            forward = self._end_line()
            if self._pending_cr:
                self._cr_ended_event = forward
            if withhold and forward is not None:
                if forward:
                    out += self._held
                    out += chunk[sent_upto:pos]
                self._held.clear()
                sent_upto = pos
        if not withhold:
            return chunk
        self._held += chunk[sent_upto:]
        if len(self._held) > self.max_event_bytes:
            # Too big to be a usage chunk: stop holding this event back.
            out += self._held
            self._held.clear()
            self._event_partly_sent = True
        return bytes(out)

    def close(self) -> bytes:
        """The upstream ended: read a last unterminated event and return the bytes still held."""
        if self._closed:
            return b""
        self._closed = True
        forward: bool | None = None
        if self._line or self._line_too_long:
            forward = self._end_line()
        if forward is None and (self._has_data or self._event_name):
            forward = self._dispatch()
        held = bytes(self._held)
        self._held.clear()
        if forward is False:
            return b""
        return held

    # -- for subclasses

    def _on_event(self, event: str, data: bytes) -> bool:
        """Handle one complete event; return False to withhold it from the client."""
        return True

    # -- the parser

    def _extend_line(self, part: bytes) -> None:
        if self._line_too_long or not part:
            return
        if len(self._line) + len(part) > self.max_event_bytes:
            self._line_too_long = True
            self._line.clear()
            return
        self._line += part

    def _end_line(self) -> bool | None:
        """Process the completed line; on an event boundary return whether to forward the event."""
        if self._line_too_long:
            self._line_too_long = False
            self._skip_event = True
            self._has_data = True
            self._data.clear()
            return None
        line = bytes(self._line)
        self._line.clear()
        if not line:
            return self._dispatch()
        if line[0] == _COLON:
            return None
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._has_data = True
            if not self._skip_event:
                self._data_size += len(value) + 1
                if self._data_size > self.max_event_bytes:
                    self._skip_event = True
                    self._data.clear()
                else:
                    self._data.append(value)
        elif name == b"event":
            self._event_name = value.decode("utf-8", "replace")
        return None

    def _dispatch(self) -> bool:
        forward = True
        if self._has_data and not self._skip_event:
            self.events += 1
            forward = self._on_event(self._event_name, b"\n".join(self._data))
        if self._event_partly_sent:
            forward = True
        self._event_name = ""
        self._data = []
        self._data_size = 0
        self._has_data = False
        self._skip_event = False
        self._event_partly_sent = False
        return forward
