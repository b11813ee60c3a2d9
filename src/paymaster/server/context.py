"""What every route needs: the authority, the metrics, and a way to run blocking verbs.

The authority's verbs block on the store's group-commit future, so each request runs its
whole synchronous part (authentication, parsing, the verb) in one worker-thread hop. One
capacity limiter of many tokens lets hundreds of requests wait on the store at once, and
so share its transactions, instead of queueing behind anyio's default of 40 threads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from paymaster.authority import Authority
from paymaster.server.body import read_body
from paymaster.server.metrics import Metrics

T = TypeVar("T")
THREAD_TOKENS = 256


class Runner:
    """Runs blocking calls on worker threads, at most ``tokens`` at a time."""

    def __init__(self, tokens: int = THREAD_TOKENS) -> None:
        self._tokens = tokens
        self._limiter: anyio.CapacityLimiter | None = None

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        # Made on first use: a limiter belongs to the event loop that runs the app.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._tokens)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)


@dataclass
class ServerState:
    authority: Authority
    metrics: Metrics = field(default_factory=Metrics)
    run: Runner = field(default_factory=Runner)


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.paymaster
    return state


@dataclass(frozen=True)
class Incoming:
    """The parts of a request that the synchronous handlers read, off the event loop."""

    method: str
    url: str
    headers: Headers
    query: QueryParams
    params: Mapping[str, str]
    raw: bytes = b""

    def param(self, name: str) -> str:
        return self.params[name]


Handler = Callable[[Authority, Incoming], tuple[int, Any]]


def endpoint(
    handler: Handler, *, body: bool = False, timed: bool = False
) -> Callable[[Request], Awaitable[Response]]:
    """An async Starlette endpoint around a synchronous ``handler`` that returns
    ``(status, json)``. ``body`` reads the request body first (bounded); ``timed`` feeds the
    reserve latency histogram."""

    async def handle(request: Request) -> Response:
        state = server_state(request)
        raw = await read_body(request) if body else b""
        incoming = Incoming(
            method=request.method,
            url=str(request.url),
            headers=request.headers,
            query=request.query_params,
            params=dict(request.path_params),
            raw=raw,
        )
        started = anyio.current_time() if timed else 0.0
        try:
            status, payload = await state.run(handler, state.authority, incoming)
        finally:
            if timed:
                state.metrics.observe_reserve(anyio.current_time() - started)
        return JSONResponse(payload, status_code=status)

    handle.__name__ = handler.__name__
    return handle
