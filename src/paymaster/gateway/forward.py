"""The upstream side: one pooled aiohttp client, and what crosses it in each direction.

Request headers: the agent's own credentials (``authorization``, ``proxy-authorization``,
``x-api-key``, ``api-key``, ``x-goog-api-key``, ``cookie``), every ``x-paymaster-*``
header, hop-by-hop headers (and those ``connection`` names), ``host``, ``content-length``
and ``expect`` are dropped; the connector's credential is injected; ``accept-encoding`` is
``identity`` so that usage can be read from the bytes as they pass.

Response headers: hop-by-hop, ``content-length``, ``content-encoding`` (the body is passed
decoded), ``set-cookie`` (agents hold no provider session), ``date`` and ``server`` (the
gateway's own server sets them) and any ``x-paymaster-*`` header (an upstream cannot speak
for the authority) are dropped, and so is any header whose value contains the connector's
credential.

aiohttp rather than httpx: ARCHITECTURE.md records httpx 0.28's async pool as a bottleneck
at 50 concurrent requests; bench/gateway.py measures the proxy on this client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from paymaster.config import ConnectorConfig
from paymaster.gateway.routing import GuardedResolver

__all__ = [
    "NotSent",
    "SentFailed",
    "Upstream",
    "downstream_headers",
    "upstream_headers",
]

POOL_LIMIT: Final = 512
CONNECT_TIMEOUT: Final = 10.0
KEEPALIVE_SECONDS: Final = 15.0

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
AGENT_CREDENTIALS: Final = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie"}
)
_REQUEST_DROPPED: Final = (
    HOP_BY_HOP | AGENT_CREDENTIALS | {"host", "content-length", "expect", "accept-encoding"}
)
# date and server: the gateway's own server sets them
_RESPONSE_DROPPED: Final = HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie", "date", "server"}
PAYMASTER_PREFIX: Final = "x-paymaster-"


class NotSent(Exception):
    """The request never reached the provider (connect, DNS, TLS): nothing to charge."""


class SentFailed(Exception):
    """The connection failed after the request was (or may have been) sent."""


def _named_by_connection(headers: Iterable[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name == "connection":
            named.update(part.strip().lower() for part in value.split(",") if part.strip())
    return named


def upstream_headers(
    raw: Sequence[tuple[bytes, bytes]], credential: tuple[str, str] | None
) -> CIMultiDict[str]:
    """The headers to send upstream, from the agent's raw ASGI headers."""
    decoded = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]
    dropped = _REQUEST_DROPPED | _named_by_connection(decoded)
    if credential is not None:
        dropped = dropped | {credential[0].lower()}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in decoded:
        if name in dropped or name.startswith(PAYMASTER_PREFIX):
            continue
        out.add(name, value)
    out["accept-encoding"] = "identity"
    if credential is not None:
        out[credential[0]] = credential[1]
    return out


def downstream_headers(headers: Iterable[tuple[str, str]], secret: str | None) -> list[tuple[bytes, bytes]]:
    """The upstream response headers to pass to the agent, as raw ASGI headers."""
    items = [(k.lower(), v) for k, v in headers]
    dropped = _RESPONSE_DROPPED | _named_by_connection(items)
    out: list[tuple[bytes, bytes]] = []
    for name, value in items:
        if name in dropped or name.startswith(PAYMASTER_PREFIX):
            continue
        if secret and secret in value:
            continue
        out.append((name.encode("latin-1"), value.encode("latin-1", "replace")))
    return out


def credential_of(connector: ConnectorConfig) -> tuple[str, str] | None:
    """The connector's credential header; None when it has none (or it expands to nothing)."""
    header = connector.credential_header()
    if header is None or not header[1]:
        return None
    return header


class Upstream:
    """The pooled upstream client, made on first use in the running event loop (ASGI test
    transports run no lifespan) and closed by :meth:`close`."""

    def __init__(self, allow_private: frozenset[str], *, limit: int = POOL_LIMIT) -> None:
        self._allow_private = allow_private
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._lock: asyncio.Lock | None = None

    async def session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is not None and not session.closed:
            return session
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._session is None or self._session.closed:
                connector = aiohttp.TCPConnector(
                    limit=self._limit,
                    limit_per_host=0,
                    resolver=GuardedResolver(self._allow_private),
                    keepalive_timeout=KEEPALIVE_SECONDS,
                    ttl_dns_cache=10,
                )
                self._session = aiohttp.ClientSession(
                    connector=connector,
                    auto_decompress=True,
                    # the agent's cookies never reach the provider, the provider's never stick
                    cookie_jar=aiohttp.DummyCookieJar(),
                    skip_auto_headers=("User-Agent",),
                )
            return self._session

    async def send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        timeout: float,
    ) -> aiohttp.ClientResponse:
        """Send the request; :class:`NotSent` or :class:`SentFailed` when it fails."""
        session = await self.session()
        try:
            return await session.request(
                method,
                URL(url, encoded=True),
                headers=headers,
                data=body if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS") else None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(CONNECT_TIMEOUT, timeout)),
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL) as exc:
            raise NotSent(str(exc) or type(exc).__name__) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SentFailed(str(exc) or type(exc).__name__) from exc

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
