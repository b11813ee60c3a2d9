"""Where a proxied request may go: the target parsed from the raw path, the connector that
serves its host, and the SSRF rules.

- ``{host}`` is read from the *raw* request path, never from the decoded one (``%2F`` would
  otherwise move text between the host and the path). It must be a bare DNS name or IPv4
  literal with an optional port: no userinfo, no ``@``, no percent-encoding, no IPv6
  literal, no empty label; it is lowercased, an internationalised name is IDNA-encoded,
  one trailing dot is dropped and ``:443`` is implied.
- The path may not contain ``.`` or ``..`` segments (percent-encoded or not) nor control
  characters, so it cannot climb out of a connector's ``upstream`` base path.
- Only a host that a configured connector names is forwarded to. A connector without
  ``upstream`` is reached at ``https://{host}``, and only when every address the host
  resolves to is public: loopback, private, link-local, shared, reserved and multicast
  addresses are refused, before the reserve (a clear ``policy_domain_blocked``) and again
  at connect time by :class:`GuardedResolver` (so a DNS answer that changes in between is
  caught). An explicit ``upstream`` may name any address: the operator chose it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from paymaster.config import ConnectorConfig
from paymaster.core import policy as pol

__all__ = [
    "AddressGuard",
    "BadTarget",
    "ConnectorIndex",
    "GuardedResolver",
    "Target",
    "is_public_address",
    "parse_host",
    "parse_target",
]

PROXY_PREFIX: Final = b"/proxy/"
MAX_HOST: Final = 253
_LABEL_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_DOT_SEGMENTS: Final = frozenset({".", ".."})
DNS_CACHE_SECONDS: Final = 30.0


class BadTarget(Exception):
    """The proxied URL is unusable: ``kind`` is ``host`` (403 ``policy_domain_blocked``) or
    ``path`` (422 ``invalid_request``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class Target:
    """``https://{host}{path}?{query}``: what the agent asked for."""

    raw_host: str  # as it appeared in the path (for the token's audience)
    host: str  # normalised: lowercase, IDNA, no trailing dot, no :443
    path: str  # raw (percent-encoded) path, starting with "/"
    query: str  # raw query string, "" for none

    @property
    def hostname(self) -> str:
        return self.host.rsplit(":", 1)[0] if ":" in self.host else self.host

    @property
    def url(self) -> str:
        """The normalised URL (what the loop guard counts)."""
        return f"https://{self.host}{self.path}" + (f"?{self.query}" if self.query else "")

    @property
    def asked_url(self) -> str:
        """The URL as the agent wrote it (what a spend token's ``htu`` is bound to)."""
        return f"https://{self.raw_host}{self.path}" + (f"?{self.query}" if self.query else "")


def parse_host(raw: str) -> str:
    """The normalised host of ``/proxy/{host}/…``, or :class:`BadTarget`."""
    if not raw or len(raw) > MAX_HOST + 6:
        raise BadTarget("host", "the host is empty or too long")
    if any(c in raw for c in "@/\\?#%[]") or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in raw):
        raise BadTarget("host", f"{raw!r} is not a bare host name (no userinfo, encoding or IPv6 literal)")
    name, sep, port = raw.rpartition(":") if ":" in raw else (raw, "", "")
    if sep:
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536 or ":" in name:
            raise BadTarget("host", f"{raw!r} has an invalid port")
        port = str(int(port))
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise BadTarget("host", f"{raw!r} is not a valid internationalised host name") from None
    name = name.lower()
    labels = name.split(".")
    if len(name) > MAX_HOST or not all(
        0 < len(label) <= 63 and set(label) <= _LABEL_CHARS and label[0] != "-" and label[-1] != "-"
        for label in labels
    ):
        raise BadTarget("host", f"{raw!r} is not a valid host name")
    return name if not port or port == "443" else f"{name}:{port}"


def parse_target(raw_path: bytes, query: bytes) -> Target:
    """The target of a raw ``/proxy/{host}/{path}`` request path."""
    if not raw_path.startswith(PROXY_PREFIX):
        raise BadTarget("path", "not a /proxy/{host}/{path} URL")
    rest = raw_path[len(PROXY_PREFIX) :]
    host_part, slash, path_part = rest.partition(b"/")
    try:
        raw_host = host_part.decode("ascii")
        path = "/" + path_part.decode("ascii") if slash else "/"
        query_text = query.decode("ascii")
    except UnicodeDecodeError:
        raise BadTarget("path", "the URL must be ASCII (percent-encode anything else)") from None
    host = parse_host(raw_host)
    for segment in path.split("/"):
        if unquote(segment) in _DOT_SEGMENTS:
            raise BadTarget("path", "the path may not contain '.' or '..' segments")
    if any(ord(c) < 0x21 or ord(c) == 0x7F or c in "\\#" for c in path) or "#" in query_text:
        raise BadTarget("path", "the path contains characters that are not allowed")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in query_text):
        raise BadTarget("path", "the query contains characters that are not allowed")
    return Target(raw_host=raw_host, host=host, path=path, query=query_text)


class ConnectorIndex:
    """Which connector serves a host: exact names first, then globs, in configuration order."""

    def __init__(self, connectors: Sequence[ConnectorConfig]) -> None:
        self._exact: dict[str, ConnectorConfig] = {}
        self._globs: list[tuple[str, ConnectorConfig]] = []
        for connector in connectors:
            for pattern in connector.hosts:
                if "*" in pattern:
                    self._globs.append((pattern, connector))
                else:
                    self._exact.setdefault(pattern.rstrip("."), connector)
        self.private_upstreams = frozenset(
            (urlsplit(c.upstream).hostname or "").lower() for c in connectors if c.upstream
        )
        self._bases: dict[str, str] = {
            c.id: c.upstream.rstrip("/") for c in connectors if c.upstream is not None
        }

    def lookup(self, host: str) -> ConnectorConfig | None:
        found = self._exact.get(host)
        if found is None and ":" in host:
            found = self._exact.get(host.rsplit(":", 1)[0])
        if found is not None:
            return found
        for pattern, connector in self._globs:
            if pol.host_matches(pattern, host):
                return connector
        return None

    def upstream_url(self, connector: ConnectorConfig, target: Target) -> str:
        base = self._bases.get(connector.id) or f"https://{target.host}"
        return base + target.path + (f"?{target.query}" if target.query else "")


# ---------------------------------------------------------------- SSRF


def is_public_address(address: str) -> bool:
    """Whether ``address`` (an IP literal) is globally routable; anything unparsable is not."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return mapped.is_global and not mapped.is_multicast
    return ip.is_global and not ip.is_multicast


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AddressGuard:
    """The pre-reserve SSRF check of a host reached without an explicit ``upstream``.

    Answers are cached for :data:`DNS_CACHE_SECONDS` so the hot path does not resolve on
    every call. A host that does not resolve passes here: connecting to it fails anyway
    (502 ``upstream_unavailable``, nothing charged).
    """

    def __init__(self, ttl: float = DNS_CACHE_SECONDS) -> None:
        self._ttl = ttl
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def refusal(self, hostname: str) -> str | None:
        """Why ``hostname`` may not be reached (a message), or None when it may."""
        now = time.monotonic()
        cached = self._cache.get(hostname)
        if cached is not None and cached[0] > now:
            return cached[1]
        reason = await self._check(hostname)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[hostname] = (now + self._ttl, reason)
        return reason

    async def _check(self, hostname: str) -> str | None:
        if _ip_literal(hostname):
            addresses: Iterable[str] = [hostname]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(hostname, 443, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                return None
            addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            if not is_public_address(address):
                return (
                    f"host {hostname} resolves to a non-public address ({address}); only a connector's"
                    " explicit upstream may name one"
                )
        return None


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing non-public answers for every host but the ``upstream``
    hosts the operator named: the connect-time half of the SSRF rule."""

    def __init__(self, allow_private: frozenset[str]) -> None:
        self._inner = DefaultResolver()
        self._allow = allow_private

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() in self._allow:
            return results
        for result in results:
            if not is_public_address(str(result["host"])):
                raise OSError(f"{host} resolves to a non-public address; refused")
        return results

    async def close(self) -> None:
        await self._inner.close()
