"""The OpenAPI 3.1 document of the /v1 API, written by hand to match what the server
accepts and answers (a Schemathesis test holds the two together). Request bodies are closed
(``additionalProperties: false``); responses may grow new fields."""

from __future__ import annotations

from functools import cache
from typing import Any

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    if set(schema) == {"type"} and isinstance(schema["type"], str):
        return {"type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def closed(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    """A request object: exactly these fields."""
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


def shape(properties: dict[str, Schema], required: tuple[str, ...] | None = None) -> Schema:
    """A response object: these fields (all present unless ``required`` says otherwise)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
    }


STR: Schema = {"type": "string"}
NSTR: Schema = {"type": ["string", "null"]}
BOOL: Schema = {"type": "boolean"}
INT: Schema = {"type": "integer"}
OBJ: Schema = {"type": "object"}
TIME: Schema = {"type": "string", "format": "date-time"}
NTIME: Schema = {"type": ["string", "null"], "format": "date-time"}
TEXT: Schema = {"type": "string", "minLength": 1, "maxLength": 1024}
KEY: Schema = {"type": "string", "minLength": 1, "maxLength": 256}
# One segment of a budget id: no '/', whitespace or control characters.
ID: Schema = {"type": "string", "pattern": "^[^\\s/\\x00-\\x1f\\x7f]{1,256}$"}
COUNT: Schema = {"type": "integer", "minimum": 0, "maximum": 10**12}
PERIOD: Schema = {"type": "string", "enum": ["session", "hour", "day", "week", "month", "total"]}
MODE: Schema = {"type": "string", "enum": ["enforce", "shadow"]}
SCOPE: Schema = {"type": "string", "pattern": "^(all|connector:[^\\s/]+|category:[^\\s/]+)$"}
UNITS: Schema = {"anyOf": [COUNT, {"type": "string", "pattern": "^[0-9]{1,12}(\\.[0-9]{1,9})?$"}]}

SCHEMAS: dict[str, Schema] = {
    "Money": {
        "type": "string",
        "pattern": "^-?[0-9]+(\\.[0-9]+)?$",
        "description": "A decimal string, never a JSON number.",
        "examples": ["0.0075", "20.00"],
    },
    "MoneyIn": {
        "type": "string",
        "pattern": "^[0-9]{1,12}(\\.[0-9]{1,9})?$",
        "description": "A non-negative decimal string, at most 9 decimals; a JSON number is invalid_amount.",
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": shape(
                {
                    "code": STR,
                    "message": STR,
                    "decision_id": NSTR,
                    "budget_id": NSTR,
                    "requested": NSTR,
                    "remaining": NSTR,
                    "currency": NSTR,
                    "retryable": BOOL,
                }
            )
        },
    },
    "UsageEstimate": closed(
        {
            "model": KEY,
            "input_tokens": COUNT,
            "input_text_bytes": COUNT,
            "max_output_tokens": COUNT,
            "units": UNITS,
            "unit": KEY,
        }
    ),
    "Usage": closed(
        {
            "model": KEY,
            "input_tokens": COUNT,
            "output_tokens": COUNT,
            "cached_input_tokens": COUNT,
            "units": UNITS,
            "unit": KEY,
        }
    ),
    "Cap": closed(
        {"scope": SCOPE, "period": PERIOD, "limit": ref("MoneyIn"), "mode": MODE, "tz": NSTR},
        required=("scope", "period", "limit"),
    ),
    "Policy": closed(
        {
            "allow_hosts": nullable({"type": "array", "items": STR}),
            "deny_hosts": {"type": "array", "items": STR},
            "connectors": {"anyOf": [{"const": "*"}, {"type": "array", "items": ID}]},
            "categories": {"anyOf": [{"const": "*"}, {"type": "array", "items": ID}]},
            "per_call_max": {"type": "object", "additionalProperties": ref("MoneyIn")},
            "caps": {"type": "array", "items": ref("Cap")},
            "alert_thresholds": {"type": "array", "items": STR},
            "loop_guard": nullable(
                closed(
                    {"window_seconds": INT, "max_repeats": INT}, required=("window_seconds", "max_repeats")
                )
            ),
            "allow_with_caps": BOOL,
            "on_price_unknown": {"anyOf": [{"const": "deny"}, ref("MoneyIn")]},
            "velocity_guard": nullable(
                closed(
                    {
                        "window_seconds": INT,
                        "trailing_seconds": INT,
                        "multiple": STR,
                        "min_spend": ref("MoneyIn"),
                        "action": {"type": "string", "enum": ["freeze", "tighten"]},
                        "tighten_to": nullable(ref("MoneyIn")),
                    },
                    required=("window_seconds", "trailing_seconds", "multiple", "min_spend", "action"),
                )
            ),
            "daily_cap": ref("MoneyIn"),
            "allowlist": {"type": "array", "items": STR},
        }
    ),
    "ReserveRequest": closed(
        {
            "agent_id": nullable(KEY),
            "principal": nullable(KEY),
            "connector": ID,
            "amount": nullable(ref("MoneyIn")),
            "usage_estimate": nullable(ref("UsageEstimate")),
            "session": nullable(ID),
            "task": nullable(ID),
            "ttl_seconds": {"type": ["integer", "null"], "minimum": 1, "maximum": 3600},
            "input_hash": nullable(KEY),
            "idempotency_key": nullable(KEY),
            "metadata": nullable(OBJ),
        },
        required=("connector",),
    ),
    "ReserveResponse": shape(
        {
            "reservation_id": STR,
            "decision": {"type": "string", "enum": ["allow", "allow_with_caps"]},
            "amount": ref("Money"),
            "currency": STR,
            "expires_at": TIME,
            "budgets": {
                "type": "array",
                "items": shape(
                    {"id": STR, "remaining": ref("Money"), "mode": MODE}, required=("id", "remaining")
                ),
            },
            "warnings": {"type": "array", "items": STR},
            "decision_id": STR,
            "shadow_denials": {"type": "array", "items": STR},
        },
        required=("reservation_id", "decision", "amount", "expires_at", "budgets", "warnings"),
    ),
    "CommitRequest": closed(
        {
            "amount": nullable(ref("MoneyIn")),
            "usage": nullable(ref("Usage")),
            "idempotency_key": nullable(KEY),
        }
    ),
    "CommitResponse": shape(
        {
            "reservation_id": STR,
            "charged": ref("Money"),
            "released": ref("Money"),
            "overrun": BOOL,
            "estimated": BOOL,
            "ledger_entry_id": STR,
            "currency": STR,
        }
    ),
    "ReleaseRequest": closed({"reason": nullable(TEXT)}),
    "ReleaseResponse": shape({"reservation_id": STR, "released": ref("Money")}),
    "Reservation": shape(
        {
            "reservation_id": STR,
            "status": {"type": "string", "enum": ["held", "committed", "released", "expired"]},
            "decision": STR,
            "agent_id": NSTR,
            "principal": NSTR,
            "connector": STR,
            "category": NSTR,
            "amount": ref("Money"),
            "charged": nullable(ref("Money")),
            "currency": STR,
            "estimated": BOOL,
            "overrun": BOOL,
            "budgets": {"type": "array", "items": STR},
            "session": NSTR,
            "task": NSTR,
            "input_hash": NSTR,
            "created_at": TIME,
            "expires_at": TIME,
            "settled_at": NTIME,
            "ledger_entry_id": NSTR,
            "metadata": OBJ,
        }
    ),
    "RefundRequest": closed(
        {"ledger_entry_id": KEY, "amount": ref("MoneyIn"), "reason": TEXT, "idempotency_key": nullable(KEY)},
        required=("ledger_entry_id", "amount", "reason"),
    ),
    "RefundResponse": shape(
        {"refund_id": STR, "amount": ref("Money"), "ledger_entry_id": STR, "currency": STR},
        required=("refund_id", "amount"),
    ),
    "Budget": shape(
        {
            "id": STR,
            "kind": {"type": "string", "enum": ["wallet", "cap", "task"]},
            "owner": STR,
            "scope": STR,
            "limit": ref("Money"),
            "spent": ref("Money"),
            "reserved": ref("Money"),
            "remaining": ref("Money"),
            "used": STR,
            "currency": STR,
            "period": PERIOD,
            "mode": MODE,
            "tz": NSTR,
            "window_start": NTIME,
            "window_end": NTIME,
        }
    ),
    "AgentBudgets": shape({"agent": STR, "budgets": {"type": "array", "items": ref("Budget")}}),
    "TaskRequest": closed(
        {"limit": ref("MoneyIn"), "parent_task": nullable(KEY), "agents": {"type": "array", "items": KEY}},
        required=("limit",),
    ),
    "Task": shape(
        {
            "task_id": STR,
            "budget_id": STR,
            "limit": ref("Money"),
            "currency": STR,
            "parent_task": NSTR,
            "agents": {"type": "array", "items": STR},
        }
    ),
    "AgentCreate": closed(
        {
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "public_key": {
                "type": "string",
                "pattern": "^[A-Za-z0-9_-]{43}$",
                "description": "base64url (no padding) of the raw 32-byte ed25519 public key",
            },
            "policy": nullable(ref("Policy")),
            "parent": nullable({"type": "string", "minLength": 1, "maxLength": 200}),
            "metadata": nullable(OBJ),
        },
        required=("name", "public_key"),
    ),
    "Agent": shape(
        {
            "id": STR,
            "name": STR,
            "status": {"type": "string", "enum": ["active", "frozen", "revoked"]},
            "public_key": STR,
            "parent": NSTR,
            "metadata": OBJ,
            "policy": nullable(OBJ),
            "policy_version": INT,
            "created_at": TIME,
        }
    ),
    "AgentList": shape({"agents": {"type": "array", "items": ref("Agent")}}),
    "FundRequest": closed({"amount": ref("MoneyIn"), "idempotency_key": nullable(KEY)}, required=("amount",)),
    "Empty": closed({}),
    "PrincipalPut": closed({"parent": nullable(STR), "policy": nullable(ref("Policy"))}),
    "Principal": shape({"principal": STR, "parent": NSTR, "policy_version": INT, "policy": nullable(OBJ)}),
    "CapCreate": closed(
        {
            "owner": {"type": "string", "minLength": 1, "maxLength": 200},
            "scope": SCOPE,
            "period": PERIOD,
            "limit": ref("MoneyIn"),
            "mode": MODE,
            "tz": nullable({"type": "string", "maxLength": 64}),
        },
        required=("owner", "period", "limit"),
    ),
    "LedgerEntry": shape(
        {
            "id": STR,
            "kind": {"type": "string", "enum": ["charge", "refund"]},
            "time": TIME,
            "agent_id": NSTR,
            "principal": NSTR,
            "connector": NSTR,
            "category": NSTR,
            "input_hash": NSTR,
            "quantity": NSTR,
            "unit": NSTR,
            "unit_cost": NSTR,
            "total": ref("Money"),
            "currency": STR,
            "reservation_id": NSTR,
            "refund_of": NSTR,
            "refunded": ref("Money"),
            "task": NSTR,
            "session": NSTR,
            "budgets": {"type": "array", "items": STR},
            "estimated": BOOL,
            "overrun": BOOL,
            "reason": NSTR,
        }
    ),
    "Ledger": shape({"entries": {"type": "array", "items": ref("LedgerEntry")}}),
    "Events": shape(
        {
            "events": {
                "type": "array",
                "items": shape(
                    {"specversion": STR, "id": STR, "source": STR, "type": STR, "time": TIME, "seq": INT},
                    required=("specversion", "id", "source", "type", "seq"),
                ),
            },
            "next_after_seq": INT,
        }
    ),
    "VerifyResult": shape(
        {
            "ok": BOOL,
            "events": INT,
            "head_seq": INT,
            "first_bad_seq": {"type": ["integer", "null"]},
            "reason": NSTR,
        },
        required=("ok", "events", "head_seq"),
    ),
    "JWKS": shape(
        {
            "keys": {
                "type": "array",
                "items": shape(
                    {
                        "kty": {"const": "OKP"},
                        "crv": {"const": "Ed25519"},
                        "x": STR,
                        "kid": STR,
                        "alg": STR,
                        "use": STR,
                    },
                    required=("kty", "crv", "x", "kid"),
                ),
            }
        }
    ),
    "Health": shape({"ok": {"const": True}}),
}

_REASONS = {
    200: "OK",
    201: "Created",
    401: "Identity: spend_token_*, agent_unknown, agent_revoked, admin_key_required",
    402: "policy_cap_exceeded, balance_insufficient, per_call_limit_exceeded, spend_token_amount_exceeded",
    403: "Policy: connector_blocked, agent_frozen, task_forbidden, no_budget_configured",
    404: "not_found",
    409: "State: idempotency_conflict, reservation_settled, reservation_expired, agent_revoked",
    413: "invalid_request: the body is larger than 1 MiB",
    422: "invalid_request, invalid_amount, price_unknown, price_stale, fx_rate_unknown",
    429: "loop_detected",
    503: "authority_unavailable: the store cannot be reached (fail closed)",
}


def errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {"description": _REASONS[code], "content": {JSON: {"schema": ref("Error")}}}
        for code in (*codes, 503)
    }


def ok(code: int, schema: str, description: str | None = None) -> dict[str, Any]:
    return {
        str(code): {"description": description or _REASONS[code], "content": {JSON: {"schema": ref(schema)}}}
    }


def body(schema: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": ref(schema)}}}


def path_param(name: str, description: str = "") -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


def query(name: str, schema: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def header(name: str, description: str) -> Schema:
    return {"name": name, "in": "header", "required": False, "schema": KEY, "description": description}


IDEMPOTENCY = header("x-paymaster-idempotency-key", "The idempotency key, when the body has none.")
Security = dict[str, list[str]]
ADMIN: list[Security] = [{"adminKey": []}]
AGENT: Security = {"spendToken": [], "agentId": []}
SETTLERS: list[Security] = [AGENT, {"serviceKey": []}, {"adminKey": []}]
READERS: list[Security] = [AGENT, {"adminKey": []}]
ID_PARAM = path_param("id")


def op(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    security: list[Security] | None = None,
    request: dict[str, Any] | None = None,
    parameters: list[Schema] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": operation_id, "summary": summary, "responses": responses}
    out["security"] = security if security is not None else ADMIN
    if request is not None:
        out["requestBody"] = request
    if parameters:
        out["parameters"] = parameters
    return out


def _status(name: str, what: str) -> dict[str, Any]:
    return {
        "post": op(
            f"{name}Agent",
            what,
            {**ok(200, "Agent"), **errors(401, 404, 409, 413, 422)},
            request=body("Empty", required=False),
            parameters=[ID_PARAM],
        )
    }


PATHS: dict[str, Any] = {
    "/v1/reservations": {
        "post": op(
            "reserve",
            "Hold a call's cost on every budget of its path, or refuse it",
            {**ok(201, "ReserveResponse"), **errors(401, 402, 403, 404, 409, 413, 422, 429)},
            security=[AGENT, {"serviceKey": []}],
            request=body("ReserveRequest"),
            parameters=[
                IDEMPOTENCY,
                header("x-paymaster-session", "The call's session, when the body names none."),
                header("x-paymaster-task", "The call's task, when the body names none."),
            ],
        )
    },
    "/v1/reservations/{id}": {
        "get": op(
            "queryReservation",
            "A reservation and what became of it",
            {**ok(200, "Reservation"), **errors(401, 404)},
            security=SETTLERS,
            parameters=[ID_PARAM],
        )
    },
    "/v1/reservations/{id}/commit": {
        "post": op(
            "commit",
            "Charge the actual cost and release the rest of the hold",
            {**ok(200, "CommitResponse"), **errors(401, 404, 409, 413, 422)},
            security=SETTLERS,
            request=body("CommitRequest"),
            parameters=[ID_PARAM, IDEMPOTENCY],
        )
    },
    "/v1/reservations/{id}/release": {
        "post": op(
            "release",
            "Give the whole hold back",
            {**ok(200, "ReleaseResponse"), **errors(401, 404, 409, 413, 422)},
            security=SETTLERS,
            request=body("ReleaseRequest", required=False),
            parameters=[ID_PARAM],
        )
    },
    "/v1/refunds": {
        "post": op(
            "refund",
            "Give (part of) a charge back to every budget it was debited from",
            {**ok(201, "RefundResponse"), **errors(401, 404, 409, 413, 422)},
            request=body("RefundRequest"),
            parameters=[IDEMPOTENCY],
        )
    },
    "/v1/budgets/{id}": {
        "get": op(
            "queryBudget",
            "A budget window by id (with its slashes); without a window, the current one",
            {**ok(200, "Budget"), **errors(401, 404, 422)},
            security=READERS,
            parameters=[path_param("id", "e.g. ag_…/total, ag_…/day/2026-11-24, team:x/connector:y/month")],
        )
    },
    "/v1/budgets": {
        "post": op(
            "addCap",
            "Add or replace one cap on an agent's or principal's policy (a new policy version)",
            {**ok(201, "Budget", "The cap's budget in its current window"), **errors(401, 404, 413, 422)},
            request=body("CapCreate"),
        )
    },
    "/v1/agents/{id}/budgets": {
        "get": op(
            "agentBudgets",
            "Every budget on an agent's path, in its current window",
            {**ok(200, "AgentBudgets"), **errors(401, 404)},
            security=READERS,
            parameters=[ID_PARAM],
        )
    },
    "/v1/tasks": {
        "post": op(
            "createTask",
            "A delegation budget for the agents listed on it",
            {**ok(201, "Task"), **errors(401, 403, 404, 413, 422)},
            security=READERS,
            request=body("TaskRequest"),
        )
    },
    "/v1/agents": {
        "post": op(
            "createAgent",
            "Register an agent by its public key",
            {**ok(201, "Agent"), **errors(401, 413, 422)},
            request=body("AgentCreate"),
        ),
        "get": op("listAgents", "Every agent", {**ok(200, "AgentList"), **errors(401)}),
    },
    "/v1/agents/{id}": {
        "get": op("getAgent", "One agent", {**ok(200, "Agent"), **errors(401, 404)}, parameters=[ID_PARAM])
    },
    "/v1/agents/{id}/policy": {
        "put": op(
            "setAgentPolicy",
            "Replace the agent's policy (a new version)",
            {**ok(200, "Agent"), **errors(401, 404, 413, 422)},
            request=body("Policy"),
            parameters=[ID_PARAM],
        )
    },
    "/v1/agents/{id}/fund": {
        "post": op(
            "fundAgent",
            "Raise the agent's wallet limit",
            {**ok(200, "Budget", "The wallet"), **errors(401, 404, 409, 413, 422)},
            request=body("FundRequest"),
            parameters=[ID_PARAM, IDEMPOTENCY],
        )
    },
    "/v1/agents/{id}/freeze": _status("freeze", "Pause the agent: every reserve is refused until unfrozen"),
    "/v1/agents/{id}/unfreeze": _status("unfreeze", "Resume a frozen agent (a revoked one stays revoked)"),
    "/v1/agents/{id}/revoke": _status("revoke", "Revoke the agent, for good"),
    "/v1/principals/{name}": {
        "put": op(
            "putPrincipal",
            "Create or change a principal (team, tenant): its parent and policy",
            {
                **ok(200, "Principal", "Changed"),
                **ok(201, "Principal", "Created"),
                **errors(401, 404, 413, 422),
            },
            request=body("PrincipalPut", required=False),
            parameters=[path_param("name")],
        )
    },
    "/v1/ledger": {
        "get": op(
            "ledger",
            "Charges and refunds, oldest first",
            {**ok(200, "Ledger"), **errors(401, 422)},
            parameters=[
                query("agent", STR),
                query("connector", STR),
                query("since", STR, "RFC 3339 time or date; entries at or after it"),
                query("until", STR, "RFC 3339 time or date; entries before it"),
                query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}),
            ],
        )
    },
    "/v1/events": {
        "get": op(
            "events",
            "The audit chain (CloudEvents), in order",
            {**ok(200, "Events"), **errors(401, 422)},
            parameters=[
                query("after_seq", {"type": "integer", "minimum": 0}),
                query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}),
            ],
        )
    },
    "/v1/audit/verify": {
        "get": op(
            "verifyAudit",
            "Walk the hash chain and check the signed head",
            {
                **ok(200, "VerifyResult", "The chain verifies"),
                **ok(409, "VerifyResult", "The chain is broken at first_bad_seq"),
                **errors(401),
            },
        )
    },
    "/v1/reports/focus": {
        "get": op(
            "focusReport",
            "FOCUS 1.0 CSV of the ledger entries in [from, to) (served by the dashboard package)",
            {
                "200": {"description": "OK", "content": {"text/csv": {"schema": STR}}},
                **errors(401, 422),
            },
            parameters=[
                {
                    **query("from", STR, "A date (YYYY-MM-DD, midnight UTC) or an RFC 3339 time"),
                    "required": True,
                },
                {**query("to", STR, "Exclusive bound, same forms"), "required": True},
            ],
        )
    },
    "/v1/authority/keys": {
        "get": op("authorityKeys", "The authority's public keys (JWKS)", ok(200, "JWKS"), security=[])
    },
    "/healthz": {
        "get": op(
            "health",
            "Whether the store answers",
            {**ok(200, "Health"), **errors()},
            security=[],
        )
    },
    "/metrics": {
        "get": op(
            "metrics",
            "Prometheus text metrics (paymaster_ prefix)",
            {"200": {"description": "OK", "content": {"text/plain": {"schema": STR}}}},
            security=[],
        )
    },
}


@cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Paymaster",
            "version": "1",
            "description": "The spend authority for AI agents: reserve, commit, release, refund, "
            "before the call. Every error has the body of the Error schema.",
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "adminKey": {"type": "http", "scheme": "bearer", "description": "pm_admin_…"},
                "serviceKey": {"type": "http", "scheme": "bearer", "description": "pm_svc_…"},
                "spendToken": {"type": "apiKey", "in": "header", "name": "x-paymaster-spend-token"},
                "agentId": {"type": "apiKey", "in": "header", "name": "x-paymaster-agent-id"},
            },
        },
    }
