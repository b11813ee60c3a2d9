"""The app factory: the /v1 authority and admin API, the dashboard (with the FOCUS report),
the gateway, health and metrics.

The lifespan runs the expiry sweeper (holds past their ``expires_at`` are settled even when
nobody touches them again); on shutdown it lets the gateway close its upstream pools, then
closes the store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from paymaster.authority import Authority
from paymaster.server import gateway, ui
from paymaster.server.context import ServerState
from paymaster.server.errors import ERROR_CODE_KEY, HANDLERS, unexpected_response
from paymaster.server.metrics import Metrics
from paymaster.server.routes import api_routes

logger = logging.getLogger("paymaster.server")
SWEEP_SECONDS = 1.0
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Observe:
    """Counts every response by route template and status, and turns any exception that
    escaped the handlers into the error body (503 for the store, else 500) — the last line
    that keeps a traceback from reaching a client."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception as exc:
            if status:
                raise  # the response has begun: nothing honest can be sent any more
            await unexpected_response(exc, scope)(scope, receive, send_observed)
        finally:
            route = scope.get("route")
            label = str(getattr(route, "path", "")) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.metrics.observe_request(label, method, status, scope.get(ERROR_CODE_KEY))


class Sweeper:
    """Expires due holds every ``interval`` seconds on its own thread."""

    def __init__(self, authority: Authority, interval: float = SWEEP_SECONDS) -> None:
        self.authority = authority
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paymaster-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.authority.expire_due()
            except Exception:  # a failed sweep is retried on the next tick
                logger.exception("expiry sweep failed")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    state: ServerState = app.state.paymaster
    sweeper = Sweeper(state.authority)
    sweeper.start()
    try:
        yield
    finally:
        sweeper.stop()
        try:
            await gateway.shutdown(app)  # streams still settling finish before the store closes
        finally:
            state.authority.store.close()


def create_app(authority: Authority) -> Starlette:
    state = ServerState(authority)
    app = Starlette(
        routes=[*api_routes(), *ui.routes(authority), *gateway.routes(authority)],
        middleware=[Middleware(Observe, metrics=state.metrics)],
        exception_handlers=dict[Any, Any](HANDLERS),
        lifespan=lifespan,
    )
    # "/v1/agents/" is not "/v1/agents": a 404, not a redirect that a POST would not follow
    app.router.redirect_slashes = False
    app.state.paymaster = state
    return app
