"""An httpx client whose requests go through the Paymaster gateway, each with its own
spend token; hand it to any SDK that accepts an httpx client::

    http = paymaster.governed_httpx_client("http://127.0.0.1:8787", agent_id=agent.id, key=key)
    llm = openai.OpenAI(api_key="held-by-the-gateway", http_client=http)
    claude = anthropic.Anthropic(api_key="held-by-the-gateway", http_client=http)

The provider credentials live in the gateway's connector configuration; the api key given
to the provider SDK is a placeholder that the gateway strips.

It is a transport wrapper (:class:`GovernedTransport` / :class:`AsyncGovernedTransport`):
a request for ``https://HOST/PATH?Q`` is sent to ``{gateway}/proxy/HOST/PATH?Q`` with

- ``x-paymaster-agent-id``;
- ``x-paymaster-spend-token``: a fresh single-use token per request (also per retry and
  per redirect hop), ``aud`` = HOST, ``htm``/``htu`` bound to the *original* method and
  URL, and ``max``, ``session``, ``task`` when given;
- ``x-paymaster-session`` / ``x-paymaster-task`` when given;
- ``x-paymaster-idempotency-key``: the request's own (``x-paymaster-idempotency-key``, else
  a standard ``Idempotency-Key`` header, which an SDK keeps across its retries of one
  call) when it has one, else a new UUID per request.

A request may carry its own ``x-paymaster-session`` or ``x-paymaster-task`` header to
override the client's for that call. Responses come back untouched, streams included (the
body is never read here), and a gateway denial is an ordinary HTTP response with the
Denials body, so the wrapped SDK raises its own error for it (e.g. ``openai.APIStatusError``
with ``status_code`` 402 and ``body["error"]["code"] == "policy_cap_exceeded"``).
Requests to the gateway itself pass unchanged. Plain ``http://`` requests to any other
host are refused (``httpx.UnsupportedProtocol``): the gateway forwards to ``https://``
only, and nothing leaves ungoverned.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from paymaster.sdk._common import AGENT_HEADER, IDEMPOTENCY_HEADER, SESSION_HEADER, TASK_HEADER, TOKEN_HEADER
from paymaster.sdk.keys import AgentKey
from paymaster.sdk.models import AmountLike, format_amount

__all__ = [
    "AsyncGovernedTransport",
    "GovernedTransport",
    "async_governed_httpx_client",
    "governed_httpx_client",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# httpx keyword arguments that would route requests around the governed transport.
_BYPASSING_KWARGS = ("mounts", "proxy", "app")


class _Rewriter:
    """Turns an agent's request into a governed gateway request; shared by both transports."""

    def __init__(
        self,
        gateway_url: str | httpx.URL,
        *,
        agent_id: str,
        key: AgentKey,
        session: str | None,
        task: str | None,
        max_amount: AmountLike | None,
        token_ttl: int,
    ) -> None:
        gateway = httpx.URL(gateway_url)
        if gateway.scheme not in _DEFAULT_PORTS or not gateway.host:
            raise ValueError(f"gateway_url must be an absolute http(s) URL, not {str(gateway_url)!r}")
        if not isinstance(key, AgentKey):
            raise TypeError(f"key must be a paymaster.AgentKey, not {type(key).__name__}")
        if not isinstance(agent_id, str) or not agent_id:
            raise ValueError("agent_id must be the agent's id (ag_…)")
        self.gateway = gateway.copy_with(query=None, fragment=None)
        self._gateway_origin = _origin(self.gateway)
        self._prefix = self.gateway.raw_path.split(b"?", 1)[0].rstrip(b"/")
        self.agent_id = agent_id
        self._key = key
        self.session = session
        self.task = task
        self.max_amount = None if max_amount is None else format_amount(max_amount, field_name="max_amount")
        self.token_ttl = token_ttl
        # Sign once now, so that a bad ttl or max fails here rather than on the first call.
        key.sign(agent_id=agent_id, aud="example.com", ttl_seconds=token_ttl, max_amount=self.max_amount)

    def rewrite(self, request: httpx.Request) -> httpx.Request:
        url = request.url
        if _origin(url) == self._gateway_origin:
            return request
        if url.scheme != "https":
            raise httpx.UnsupportedProtocol(
                f"a governed client sends https:// requests through the gateway; refusing {url.scheme}://"
                f"{url.host}",
                request=request,
            )
        host = url.raw_host.decode("ascii").lower()
        literal = f"[{host}]" if ":" in host else host  # an IPv6 literal in brackets
        authority = literal if url.port in (None, 443) else f"{literal}:{url.port}"
        target = self.gateway.copy_with(
            raw_path=self._prefix + b"/proxy/" + authority.encode("ascii") + url.raw_path
        )

        headers = request.headers.copy()
        session = headers.get(SESSION_HEADER) or self.session
        task = headers.get(TASK_HEADER) or self.task
        token = self._key.sign(
            agent_id=self.agent_id,
            aud=host,
            ttl_seconds=self.token_ttl,
            max_amount=self.max_amount,
            htm=request.method,
            htu=str(url),
            task=task,
            session=session,
        )
        headers["host"] = target.netloc.decode("ascii")
        headers[AGENT_HEADER] = self.agent_id
        headers[TOKEN_HEADER] = token
        if session:
            headers[SESSION_HEADER] = session
        if task:
            headers[TASK_HEADER] = task
        if IDEMPOTENCY_HEADER not in headers:
            headers[IDEMPOTENCY_HEADER] = headers.get("idempotency-key") or str(uuid.uuid4())
        return httpx.Request(
            request.method, target, headers=headers, stream=request.stream, extensions=request.extensions
        )


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    scheme = url.scheme
    return scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(scheme)


class GovernedTransport(httpx.BaseTransport):
    """Routes every request through the gateway with a fresh spend token (see the module docs)."""

    def __init__(
        self,
        gateway_url: str | httpx.URL,
        *,
        agent_id: str,
        key: AgentKey,
        session: str | None = None,
        task: str | None = None,
        max_amount: AmountLike | None = None,
        token_ttl: int = 60,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._rewriter = _Rewriter(
            gateway_url,
            agent_id=agent_id,
            key=key,
            session=session,
            task=task,
            max_amount=max_amount,
            token_ttl=token_ttl,
        )
        self._inner = transport if transport is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._inner.handle_request(self._rewriter.rewrite(request))

    def close(self) -> None:
        self._inner.close()


class AsyncGovernedTransport(httpx.AsyncBaseTransport):
    """The asynchronous twin of :class:`GovernedTransport`."""

    def __init__(
        self,
        gateway_url: str | httpx.URL,
        *,
        agent_id: str,
        key: AgentKey,
        session: str | None = None,
        task: str | None = None,
        max_amount: AmountLike | None = None,
        token_ttl: int = 60,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._rewriter = _Rewriter(
            gateway_url,
            agent_id=agent_id,
            key=key,
            session=session,
            task=task,
            max_amount=max_amount,
            token_ttl=token_ttl,
        )
        self._inner = transport if transport is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(self._rewriter.rewrite(request))

    async def aclose(self) -> None:
        await self._inner.aclose()


def _check_kwargs(httpx_kwargs: dict[str, Any]) -> None:
    bypass = [name for name in _BYPASSING_KWARGS if name in httpx_kwargs]
    if bypass:
        raise TypeError(
            f"{', '.join(bypass)} would send requests around the gateway; give an inner transport instead "
            "(transport=httpx.HTTPTransport(proxy=...))"
        )


def governed_httpx_client(
    gateway_url: str | httpx.URL,
    *,
    agent_id: str,
    key: AgentKey,
    session: str | None = None,
    task: str | None = None,
    max_amount: AmountLike | None = None,
    token_ttl: int = 60,
    **httpx_kwargs: Any,
) -> httpx.Client:
    """An ``httpx.Client`` whose requests to ``https://HOST/…`` go through the gateway at
    ``gateway_url``, each with a fresh spend token (see :mod:`paymaster.sdk.governed`).

    ``max_amount`` caps what any one request may cost (the token's ``max``); ``token_ttl``
    is each token's lifetime in seconds (at most 300). Other keyword arguments go to
    ``httpx.Client``; ``transport=`` is the inner transport the gateway requests are sent
    with (default ``httpx.HTTPTransport()``).
    """
    _check_kwargs(httpx_kwargs)
    inner: httpx.BaseTransport | None = httpx_kwargs.pop("transport", None)
    transport = GovernedTransport(
        gateway_url,
        agent_id=agent_id,
        key=key,
        session=session,
        task=task,
        max_amount=max_amount,
        token_ttl=token_ttl,
        transport=inner,
    )
    return httpx.Client(transport=transport, **httpx_kwargs)


def async_governed_httpx_client(
    gateway_url: str | httpx.URL,
    *,
    agent_id: str,
    key: AgentKey,
    session: str | None = None,
    task: str | None = None,
    max_amount: AmountLike | None = None,
    token_ttl: int = 60,
    **httpx_kwargs: Any,
) -> httpx.AsyncClient:
    """The ``httpx.AsyncClient`` twin of :func:`governed_httpx_client`, e.g. for
    ``openai.AsyncOpenAI(api_key="held-by-the-gateway", http_client=...)``."""
    _check_kwargs(httpx_kwargs)
    inner: httpx.AsyncBaseTransport | None = httpx_kwargs.pop("transport", None)
    transport = AsyncGovernedTransport(
        gateway_url,
        agent_id=agent_id,
        key=key,
        session=session,
        task=task,
        max_amount=max_amount,
        token_ttl=token_ttl,
        transport=inner,
    )
    return httpx.AsyncClient(transport=transport, **httpx_kwargs)
