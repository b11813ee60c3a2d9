"""One exception tree. Every class carries the reason ``code`` and HTTP ``status`` of
PROTOCOL.md's Denials table; the server turns any of them into the one JSON error body,
and the SDK turns that body back into the same class.
"""

from __future__ import annotations

from typing import Any, ClassVar


class PaymasterError(Exception):
    """Base of every error Paymaster raises on purpose."""


class SpendDenied(PaymasterError):
    """A refused or failed governed operation, with its reason code.

    ``status`` defaults to the class's but may be set per instance where PROTOCOL.md
    gives one code two statuses (``agent_revoked`` is 401 on a call, 409 on a fund).
    """

    code: str = "denied"
    default_status: ClassVar[int] = 403
    retryable_default: ClassVar[bool] = False

    def __init__(
        self,
        message: str = "",
        *,
        status: int | None = None,
        budget_id: str | None = None,
        requested: str | None = None,
        remaining: str | None = None,
        currency: str | None = None,
        decision_id: str | None = None,
        retryable: bool | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.status = status if status is not None else self.default_status
        self.budget_id = budget_id
        self.requested = requested
        self.remaining = remaining
        self.currency = currency
        self.decision_id = decision_id
        self.retryable = self.retryable_default if retryable is None else retryable
        self.extra = extra or {}

    @property
    def status_code(self) -> int:
        return self.status

    def to_body(self) -> dict[str, Any]:
        """The Denials body of PROTOCOL.md: every field present, ``null`` where it does not apply."""
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "decision_id": self.decision_id,
            "budget_id": self.budget_id,
            "requested": self.requested,
            "remaining": self.remaining,
            "currency": self.currency,
            "retryable": self.retryable,
        }
        body.update(self.extra)
        return {"error": body}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"


# 401: identity


class SpendTokenMissing(SpendDenied):
    """``spend_token_missing`` (401)."""

    code = "spend_token_missing"
    default_status = 401


class SpendTokenInvalid(SpendDenied):
    """``spend_token_invalid`` (401)."""

    code = "spend_token_invalid"
    default_status = 401


class SpendTokenExpired(SpendDenied):
    """``spend_token_expired`` (401)."""

    code = "spend_token_expired"
    default_status = 401


class SpendTokenReplayed(SpendDenied):
    """``spend_token_replayed`` (401)."""

    code = "spend_token_replayed"
    default_status = 401


class AgentUnknown(SpendDenied):
    """``agent_unknown`` (401)."""

    code = "agent_unknown"
    default_status = 401


class AgentRevoked(SpendDenied):
    """``agent_revoked`` (401)."""

    code = "agent_revoked"
    default_status = 401


class AdminKeyRequired(SpendDenied):
    """``admin_key_required`` (401)."""

    code = "admin_key_required"
    default_status = 401


# 402: money


class PolicyCapExceeded(SpendDenied):
    """``policy_cap_exceeded`` (402)."""

    code = "policy_cap_exceeded"
    default_status = 402


class BalanceInsufficient(SpendDenied):
    """``balance_insufficient`` (402)."""

    code = "balance_insufficient"
    default_status = 402


class PerCallLimitExceeded(SpendDenied):
    """``per_call_limit_exceeded`` (402)."""

    code = "per_call_limit_exceeded"
    default_status = 402


class SpendTokenAmountExceeded(SpendDenied):
    """``spend_token_amount_exceeded`` (402)."""

    code = "spend_token_amount_exceeded"
    default_status = 402


# 403: policy


class PolicyDomainBlocked(SpendDenied):
    """``policy_domain_blocked`` (403)."""

    code = "policy_domain_blocked"
    default_status = 403


class ConnectorBlocked(SpendDenied):
    """``connector_blocked`` (403)."""

    code = "connector_blocked"
    default_status = 403


class AgentFrozen(SpendDenied):
    """``agent_frozen`` (403)."""

    code = "agent_frozen"
    default_status = 403


class TaskForbidden(SpendDenied):
    """``task_forbidden`` (403)."""

    code = "task_forbidden"
    default_status = 403


class NoBudgetConfigured(SpendDenied):
    """``no_budget_configured`` (403)."""

    code = "no_budget_configured"
    default_status = 403


# 404


class NotFound(SpendDenied):
    """``not_found`` (404)."""

    code = "not_found"
    default_status = 404


# 409: state


class IdempotencyConflict(SpendDenied):
    """``idempotency_conflict`` (409)."""

    code = "idempotency_conflict"
    default_status = 409


class ReservationSettled(SpendDenied):
    """``reservation_settled`` (409)."""

    code = "reservation_settled"
    default_status = 409


class ReservationExpired(SpendDenied):
    """``reservation_expired`` (409)."""

    code = "reservation_expired"
    default_status = 409


# 422: cannot price or parse


class PriceUnknown(SpendDenied):
    """``price_unknown`` (422)."""

    code = "price_unknown"
    default_status = 422


class PriceStale(SpendDenied):
    """``price_stale`` (422)."""

    code = "price_stale"
    default_status = 422


class FxRateUnknown(SpendDenied):
    """``fx_rate_unknown`` (422)."""

    code = "fx_rate_unknown"
    default_status = 422


class InvalidAmount(SpendDenied):
    """``invalid_amount`` (422)."""

    code = "invalid_amount"
    default_status = 422


class InvalidRequest(SpendDenied):
    """``invalid_request`` (422)."""

    code = "invalid_request"
    default_status = 422


# 429


class LoopDetected(SpendDenied):
    """``loop_detected`` (429)."""

    code = "loop_detected"
    default_status = 429
    retryable_default = True


# 5xx


class UpstreamUnavailable(SpendDenied):
    """``upstream_unavailable`` (502)."""

    code = "upstream_unavailable"
    default_status = 502
    retryable_default = True


class UpstreamFailed(SpendDenied):
    """``upstream_failed`` (502)."""

    code = "upstream_failed"
    default_status = 502


class AuthorityUnavailable(SpendDenied):
    """``authority_unavailable`` (503)."""

    code = "authority_unavailable"
    default_status = 503
    retryable_default = True


ERROR_CLASSES: dict[str, type[SpendDenied]] = {
    cls.code: cls
    for cls in (
        SpendTokenMissing,
        SpendTokenInvalid,
        SpendTokenExpired,
        SpendTokenReplayed,
        AgentUnknown,
        AgentRevoked,
        AdminKeyRequired,
        PolicyCapExceeded,
        BalanceInsufficient,
        PerCallLimitExceeded,
        SpendTokenAmountExceeded,
        PolicyDomainBlocked,
        ConnectorBlocked,
        AgentFrozen,
        TaskForbidden,
        NoBudgetConfigured,
        NotFound,
        IdempotencyConflict,
        ReservationSettled,
        ReservationExpired,
        PriceUnknown,
        PriceStale,
        FxRateUnknown,
        InvalidAmount,
        InvalidRequest,
        LoopDetected,
        UpstreamUnavailable,
        UpstreamFailed,
        AuthorityUnavailable,
    )
}


def error_from_body(status: int, body: Any) -> SpendDenied:
    """Rebuild the exception a server answered with (used by the SDK)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return SpendDenied(f"unexpected response {status}", status=status)
    code = str(err.get("code", ""))
    cls = ERROR_CLASSES.get(code, SpendDenied)
    known = {"code", "message", "decision_id", "budget_id", "requested", "remaining", "currency", "retryable"}
    exc = cls(
        str(err.get("message") or code),
        status=status,
        budget_id=err.get("budget_id"),
        requested=err.get("requested"),
        remaining=err.get("remaining"),
        currency=err.get("currency"),
        decision_id=err.get("decision_id"),
        retryable=bool(err.get("retryable", False)),
        extra={k: v for k, v in err.items() if k not in known},
    )
    if cls is SpendDenied:
        exc.code = code
    return exc
