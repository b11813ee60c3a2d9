"""Who is calling: an agent with a spend token, a service key, or an admin key.

These functions block (a key lookup or an agent record may read the store) and run on the
worker thread of the request, with the verb they guard.
"""

from __future__ import annotations

import dataclasses
from typing import NoReturn

from starlette.datastructures import Headers

from paymaster.authority import Authority, Caller
from paymaster.bootstrap import lookup_api_key
from paymaster.errors import (
    AdminKeyRequired,
    AgentFrozen,
    AgentRevoked,
    SpendDenied,
    SpendTokenMissing,
    SpendTokenReplayed,
)
from paymaster.store import ops

AGENT_HEADER = "x-paymaster-agent-id"
TOKEN_HEADER = "x-paymaster-spend-token"  # noqa: S105 - a header name
AUDIENCE = "paymaster"
_MAX_KEY_LENGTH = 512


def bearer_key(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, key = value.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > _MAX_KEY_LENGTH:
        return ""  # present but unusable: refused like an unknown key
    return key


def authenticate(
    authority: Authority,
    headers: Headers,
    *,
    method: str,
    url: str,
    agent: bool = False,
    service: bool = False,
    admin: bool = False,
) -> Caller:
    """The caller, among the kinds a route accepts, or a 401.

    A spend token wins when the route takes agents; otherwise the bearer key decides.
    Without any credential, a route that takes agents answers ``spend_token_missing``; a
    key that is unknown or not accepted here answers ``admin_key_required`` where an admin
    may call, ``spend_token_missing`` elsewhere (reserve)."""
    token = headers.get(TOKEN_HEADER)
    if agent and token:
        return authority.verify_token(
            token, audience=AUDIENCE, agent_header=headers.get(AGENT_HEADER), method=method, url=url
        )
    key = bearer_key(headers)
    if key:
        found = lookup_api_key(authority, key)
        if found is not None:
            kind, principal = found
            if kind == "admin" and admin:
                return Caller.admin()
            if kind == "service" and service:
                return Caller("service", principal=principal)
    if agent and (key is None or not admin):
        what = "a spend token (x-paymaster-spend-token)" + (" or a service key" if service else "")
        raise SpendTokenMissing(f"this route needs {what}")
    raise AdminKeyRequired("this route needs Authorization: Bearer pm_admin_…")


def require_admin(authority: Authority, headers: Headers) -> Caller:
    return authenticate(authority, headers, method="", url="", admin=True)


def spend_token(authority: Authority, caller: Caller) -> Caller:
    """Spend an agent token's ``jti`` now, in its own transaction, for verbs that do not
    spend it themselves; the caller comes back without it so nothing spends it twice."""
    if caller.jti is None:
        return caller
    jti = caller.jti
    if not authority.submit(lambda tx: ops.spend_jti(tx, jti)).result():
        raise SpendTokenReplayed("this spend token was already used")
    return dataclasses.replace(caller, jti=None)


def refuse_after_token(authority: Authority, caller: Caller, denial: SpendDenied) -> NoReturn:
    """A reserve refused while parsing (step 3 of the order of checks): the token's ``jti``
    is spent first (step 1: spent as soon as the signature verifies, whatever follows), and
    the agent's status (step 2) answers before the parse error does."""
    spend_token(authority, caller)
    if caller.kind == "agent" and caller.agent_id is not None and denial.status != 401:
        # read past the cache: a freeze in another worker must be seen here too
        authority.invalidate(caller.agent_id)
        status = authority.agent(caller.agent_id).status
        if status == "revoked":
            raise AgentRevoked(f"agent {caller.agent_id} is revoked")
        if status == "frozen":
            raise AgentFrozen(f"agent {caller.agent_id} is frozen")
    raise denial
