"""OpenAI usage: Chat Completions, the Responses API, embeddings and legacy completions.

- Chat Completions: ``usage.prompt_tokens`` (cached included), ``completion_tokens`` (reasoning
  included), ``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``.
  Streams carry usage only when ``stream_options.include_usage`` is set, in a last chunk with
  ``"choices": []``, before ``data: [DONE]``.
- Responses API: ``usage.input_tokens``, ``output_tokens``, ``input_tokens_details.cached_tokens``,
  ``output_tokens_details.reasoning_tokens``; streams carry it in ``response.completed`` (or
  ``response.incomplete`` / ``response.failed``), which also ends the stream.
- Embeddings: ``usage.prompt_tokens`` and ``total_tokens``; no output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from paymaster.errors import InvalidRequest
from paymaster.usage.base import SseUsageReader, Usage, count, loads, optional_count, text_or_none

__all__ = [
    "OpenAIStreamReader",
    "ensure_openai_stream_usage",
    "is_usage_only_chunk",
    "parse_openai_usage",
    "read_openai_json",
]

RESPONSES_TERMINAL: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_TERMINAL_MARKERS: Final = tuple(f'"{name}"'.encode() for name in sorted(RESPONSES_TERMINAL))


def parse_openai_usage(usage: Any, *, model: Any = None, service_tier: Any = None) -> Usage | None:
    """Normalise an OpenAI ``usage`` object; None when it is absent or unreadable."""
    if not isinstance(usage, Mapping):
        return None
    if "prompt_tokens" in usage:  # Chat Completions, legacy completions, embeddings
        input_tokens = count(usage.get("prompt_tokens"))
        if input_tokens is None:
            return None
        output_tokens = count(usage.get("completion_tokens"))
        if output_tokens is None:
            if usage.get("completion_tokens") is not None:
                return None
            total = count(usage.get("total_tokens"))
            if total is None:
                return None
            output_tokens = max(total - input_tokens, 0)
        cached = optional_count(usage, "prompt_tokens_details", "cached_tokens")
        reasoning = optional_count(usage, "completion_tokens_details", "reasoning_tokens")
    elif "input_tokens" in usage:  # Responses API
        input_tokens = count(usage.get("input_tokens"))
        output_tokens = count(usage.get("output_tokens"))
        if input_tokens is None or output_tokens is None:
            return None
        cached = optional_count(usage, "input_tokens_details", "cached_tokens")
        reasoning = optional_count(usage, "output_tokens_details", "reasoning_tokens")
    else:
        return None
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=min(cached, input_tokens),
        reasoning_tokens=min(reasoning, output_tokens),
        model=text_or_none(model),
        service_tier=text_or_none(service_tier),
    )


def read_openai_json(document: Any) -> Usage | None:
    """Usage of a (non-streamed) OpenAI response body already parsed from JSON."""
    if not isinstance(document, Mapping):
        return None
    return parse_openai_usage(
        document.get("usage"), model=document.get("model"), service_tier=document.get("service_tier")
    )


def is_usage_only_chunk(event_data: Mapping[str, Any] | bytes | str) -> bool:
    """Whether a Chat Completions stream chunk is the usage-only one (``choices: []`` with ``usage``).

    Other chunks with an empty ``choices`` (Azure's prompt-filter results) are not.
    """
    chunk = loads(event_data) if isinstance(event_data, bytes | str) else event_data
    if not isinstance(chunk, Mapping):
        return False
    choices = chunk.get("choices")
    return isinstance(choices, list) and not choices and isinstance(chunk.get("usage"), Mapping)


def ensure_openai_stream_usage(
    body: dict[str, Any], *, path: str | None = None
) -> tuple[dict[str, Any], bool]:
    """Make a streamed Chat Completions request report its usage.

    Returns the body to send (a copy when changed, never the caller's dict mutated) and whether
    the client asked for the usage chunk itself: when False, the gateway should read the stream
    with ``withhold_usage_chunk=True``. Requests that are not streamed, and Responses API requests
    (which always report usage and reject ``include_usage``), come back unchanged with True.
    Chat Completions are recognised by ``path`` (``…/chat/completions`` or ``…/completions``)
    or, without one, by a ``messages`` or ``prompt`` field.
    """
    if body.get("stream") is not True:
        return body, True
    if path is not None:
        if not path.split("?", 1)[0].rstrip("/").endswith("completions"):
            return body, True
    elif "messages" not in body and "prompt" not in body:
        return body, True
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InvalidRequest("stream_options must be an object")
    if options.get("include_usage") is True:
        return body, True
    patched = dict(body)
    patched["stream_options"] = {**options, "include_usage": True}
    return patched, False


class OpenAIStreamReader(SseUsageReader):
    """Usage of an OpenAI stream (Chat Completions chunks or Responses API events)."""

    kind = "openai"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model: str | None = None

    def _on_event(self, event: str, data: bytes) -> bool:
        if data.strip() == b"[DONE]":
            self._finished = True
            return True
        terminal = event in RESPONSES_TERMINAL or any(marker in data for marker in _TERMINAL_MARKERS)
        if not terminal and _USAGE_OBJECT.search(data) is None:
            return True
        document = loads(data)
        if not isinstance(document, Mapping):
            return True
        kind = document.get("type")
        if isinstance(kind, str) and kind.startswith("response."):
            response = document.get("response")
            if kind in RESPONSES_TERMINAL and isinstance(response, Mapping):
                self._finished = True
                usage = read_openai_json(response)
                if usage is not None:
                    self._usage = usage
                    self.model = usage.model
            return True
        usage = read_openai_json(document)
        if usage is None:
            return True
        self._usage = usage
        self.model = usage.model
        return not (self.withhold_usage_chunk and is_usage_only_chunk(document))
