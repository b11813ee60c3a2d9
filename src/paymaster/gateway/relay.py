"""Relaying an upstream server-sent-events stream to the agent, reading its usage on the side.

The upstream is read by a *pump* task: each chunk goes through the usage reader (which may
withhold OpenAI's usage chunk from a client that did not ask for it) and straight on to the
client, never buffered. When the upstream ends, the pump settles the hold and closes the
stream with ``: paymaster charged=…``.

When the client goes away mid-stream (its ``http.disconnect`` arrives, or a send fails, or
the server cancels the request), the request returns at once and the pump carries on in the
background: it keeps reading the upstream, without sending, for the usage the provider
reports at the end — the call is being billed whether anyone listens or not — and settles
from it, or at the hold (``estimated``) when the stream ends without it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from paymaster.gateway.headers import stream_trailer
from paymaster.gateway.metering import Meter, Settlement
from paymaster.usage import SseUsageReader

__all__ = ["StreamRelay"]

logger = logging.getLogger("paymaster.gateway")

Settle = Callable[[Settlement], Awaitable[int | None]]


class StreamRelay(Response):
    """An ASGI response that relays ``upstream`` and settles the call when it ends."""

    def __init__(
        self,
        upstream: aiohttp.ClientResponse,
        *,
        headers: list[tuple[bytes, bytes]],
        reader: SseUsageReader | None,
        meter: Meter,
        answer: Mapping[str, Any],
        settle: Settle,
        keep: Callable[[asyncio.Task[None]], None],
    ) -> None:
        self.status_code = upstream.status
        self.raw_headers = headers
        self.background = None
        self._upstream = upstream
        self._reader = reader
        self._meter = meter
        self._answer = answer
        self._settle = settle
        self._keep = keep
        self._client_alive = True
        self._tail = b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
        except Exception:
            self._client_alive = False
        pump = asyncio.ensure_future(self._pump(send))
        self._keep(pump)
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pump.done():
                # gone (or cancelled): the pump finishes alone, without sending
                self._client_alive = False
            watcher.cancel()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _send(self, send: Send, body: bytes, more: bool = True) -> None:
        if not self._client_alive:
            return
        try:
            await send({"type": "http.response.body", "body": body, "more_body": more})
        except Exception:  # the client is gone (OSError under ASGI 2.4, anything else elsewhere)
            self._client_alive = False
            return
        if body:
            self._tail = (self._tail + body)[-4:]

    async def _pump(self, send: Send) -> None:
        reader = self._reader
        ended = cancelled = False
        try:
            async for chunk in self._upstream.content.iter_any():
                out = reader.feed(chunk) if reader is not None else chunk
                if out:
                    await self._send(send, out)
            if reader is not None:
                rest = reader.close()
                if rest:
                    await self._send(send, rest)
            ended = True
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            logger.info("upstream stream cut: %s", exc)
        except asyncio.CancelledError:
            # shutting down: settle what is known rather than leave the hold to expire
            self._client_alive = False
            cancelled = True
        finally:
            self._upstream.release()
        if not self._client_alive:
            missing = "client_disconnected"
        elif not ended or (reader is not None and not reader.finished):
            missing = "stream_cut"
        else:
            missing = "usage_unreadable"
        usage = reader.usage if reader is not None else None
        try:
            settlement = self._meter.from_usage(
                self._upstream.status, self._upstream.headers, usage, missing=missing
            )
        except Exception:  # a bug in metering must not leave the hold to chance
            logger.exception("metering a stream failed; charging the hold")
            settlement = self._meter.at_hold("metering_failed")
        try:
            charged = await self._settle(settlement)
        except Exception:
            logger.exception("settling a stream failed; the hold is charged when it expires")
            charged = None
        if cancelled:
            raise asyncio.CancelledError
        if not self._client_alive:
            return
        hold = self._meter.hold
        trailer = stream_trailer(self._answer, hold, charged, estimated=settlement.estimated)
        if self._tail and not self._tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")):
            trailer = (b"\n" if self._tail.endswith((b"\n", b"\r")) else b"\n\n") + trailer
        await self._send(send, trailer)
        await self._send(send, b"", more=False)
