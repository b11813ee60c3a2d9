"""All the /v1 routes, plus the public ones: health, metrics, the OpenAPI document and the
authority's public keys (JWKS)."""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives import serialization
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from paymaster.authority import Authority
from paymaster.core.audit import b64url, canonical
from paymaster.errors import AuthorityUnavailable
from paymaster.server import openapi, routes_admin, routes_authority
from paymaster.server.context import server_state
from paymaster.server.errors import error_response, logger
from paymaster.server.metrics import CONTENT_TYPE


def jwks(authority: Authority) -> dict[str, Any]:
    """The authority's ed25519 public key as a JWK Set; ``kid`` is its RFC 7638 thumbprint."""
    raw = authority.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = b64url(raw)
    kid = b64url(hashlib.sha256(canonical({"crv": "Ed25519", "kty": "OKP", "x": x})).digest())
    return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}]}


async def authority_keys(request: Request) -> Response:
    return JSONResponse(jwks(server_state(request).authority))


def _store_answers(authority: Authority) -> None:
    authority.store.read(lambda tx: tx.one("SELECT 1 AS ok"))


async def healthz(request: Request) -> Response:
    state = server_state(request)
    try:
        await state.run(_store_answers, state.authority)
    except Exception as exc:  # any failure to read is "not healthy", never a 500
        logger.warning("health check failed: %s", exc)
        return error_response(AuthorityUnavailable("the store cannot be read"), request.scope)
    return JSONResponse({"ok": True})


async def metrics(request: Request) -> Response:
    return PlainTextResponse(server_state(request).metrics.render(), media_type=CONTENT_TYPE)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document())


def api_routes() -> list[Route]:
    return [
        *routes_authority.routes(),
        *routes_admin.routes(),
        Route("/v1/authority/keys", authority_keys, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
