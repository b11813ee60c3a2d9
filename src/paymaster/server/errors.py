"""Every failure becomes the one JSON error body of PROTOCOL.md's Denials.

``SpendDenied`` carries its own code and status; Starlette's 404 and 405 and the store's
``StoreUnavailable`` are mapped here; anything else is a 500 whose body says nothing about
the cause (the cause goes to the log). The code of each error response is left in the ASGI
scope for the metrics middleware, which counts denials by code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from paymaster.errors import AuthorityUnavailable, InvalidRequest, NotFound, SpendDenied
from paymaster.store.base import StoreUnavailable

logger = logging.getLogger("paymaster.server")

ERROR_CODE_KEY = "paymaster.error_code"
ERROR_FIELDS = (
    "code",
    "message",
    "decision_id",
    "budget_id",
    "requested",
    "remaining",
    "currency",
    "retryable",
)
INTERNAL_ERROR = "internal_error"


def error_response(
    exc: SpendDenied, scope: MutableMapping[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    scope[ERROR_CODE_KEY] = exc.code
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


async def spend_denied_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SpendDenied)
    return error_response(exc, request.scope)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """The router's own refusals (no route, wrong method), in the same body shape."""
    assert isinstance(exc, HTTPException)
    denial: SpendDenied
    if exc.status_code == 404:
        denial = NotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        denial = InvalidRequest(f"method {request.method} is not allowed on {request.url.path}", status=405)
    else:
        denial = InvalidRequest(str(exc.detail), status=exc.status_code)
    return error_response(denial, request.scope, exc.headers)


def unexpected_response(exc: BaseException, scope: MutableMapping[str, Any]) -> JSONResponse:
    """503 when the store cannot be reached (fail closed), else 500; never the cause's text."""
    if isinstance(exc, StoreUnavailable):
        logger.warning("store unavailable: %s", exc)
        return error_response(AuthorityUnavailable("the authority's store is unavailable; retry"), scope)
    logger.error("unexpected error", exc_info=exc)
    scope[ERROR_CODE_KEY] = INTERNAL_ERROR
    body: dict[str, Any] = dict.fromkeys(ERROR_FIELDS)
    body.update(code=INTERNAL_ERROR, message="internal error", retryable=False)
    return JSONResponse({"error": body}, status_code=500)


async def store_unavailable_handler(request: Request, exc: Exception) -> Response:
    return unexpected_response(exc, request.scope)


# Async, so that Starlette does not run them on a worker thread.
HANDLERS = {
    SpendDenied: spend_denied_handler,
    HTTPException: http_exception_handler,
    StoreUnavailable: store_unavailable_handler,
}
