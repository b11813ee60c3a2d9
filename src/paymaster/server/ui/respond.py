"""Responses of the dashboard: security headers, the error body, cookies, form bodies."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from paymaster.errors import SpendDenied
from paymaster.server.ui.session import CSRF_COOKIE, SESSION_COOKIE

__all__ = [
    "CSP",
    "SECURITY_HEADERS",
    "FormTooLarge",
    "clear_session",
    "error_json",
    "html",
    "read_form",
    "set_csrf",
    "set_session",
]

# No script runs on these pages (the charts are SVG made on the server), so scripts are
# refused outright; everything else comes from this origin only.
CSP = (
    "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
NO_STORE = "no-store"
MAX_FORM_BYTES = 8 * 1024


class FormTooLarge(Exception):
    """A form body past :data:`MAX_FORM_BYTES`."""


def secured(response: Response, *, cache: str = NO_STORE) -> Response:
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = cache
    return response


def html(body: str, status: int = 200) -> Response:
    return secured(HTMLResponse(body, status_code=status))


def error_json(exc: SpendDenied) -> Response:
    """The one JSON error body of PROTOCOL.md, with the dashboard's headers."""
    return secured(JSONResponse(exc.to_body(), status_code=exc.status))


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session(response: Response, request: Request, token: str, max_age: int) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max_age,
        path="/",
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )


def clear_session(response: Response, request: Request) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path="/", secure=_secure(request), httponly=True, samesite="strict"
    )


def set_csrf(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        CSRF_COOKIE, token, path="/", secure=_secure(request), httponly=True, samesite="strict"
    )


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body, bounded; the first value of each field.
    Anything else (another content type, a body that is not UTF-8) reads as no fields."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    raw = bytearray()
    async for chunk in request.stream():
        raw.extend(chunk)
        if len(raw) > MAX_FORM_BYTES:
            raise FormTooLarge
    if content_type != "application/x-www-form-urlencoded":
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    try:
        fields = parse_qs(text, keep_blank_values=True, max_num_fields=20)
    except ValueError:  # too many fields
        return {}
    return {name: values[0] for name, values in fields.items() if values}
