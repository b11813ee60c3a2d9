"""The authority's pricer: the rate card, the FX table and each connector's pricing, built once.

Three jobs:

- :meth:`Pricer.price_estimate` prices an API reserve's ``usage_estimate`` (the authority
  calls it at step 7 of the order of checks);
- :meth:`Pricer.actual_cost` prices reported usage (an LLM's tokens, or units);
- :meth:`Pricer.quoter` makes the gateway's step 7 for one proxied request: connector
  ``pricing`` first, else a body naming a rate-card ``model`` (worst case, lowered under
  ``allow_with_caps``), else the policies' ``on_price_unknown``, else ``price_unknown``.

Every amount is exact integer nanos; conversions round up, against the spender. Amounts
held or charged are in the authority's currency: a price in another currency goes through
the ``[fx]`` table first (``fx_rate_unknown`` when it has no rate).

Choices where PROTOCOL.md is silent (see docs/gateway.md):

- A tiered connector holds the dearest tier price among the next
  :data:`TIER_HOLD_LOOKAHEAD` call numbers: reserves planned concurrently all read the same
  count before any of them takes its place, and the hold must cover the tier the call
  really lands in. The charge is the tier price of the call's number as counted at commit
  (never more than the hold).
- An API reserve of a tiered connector (``{units, unit: "call"}``) holds the dearest tier:
  only gateway calls take a place in the count.
- The ``[prices]`` freshness (``max_age``) applies to prices read from the rate card, not to
  a connector's own ``pricing`` table (the operator's configuration is the price).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, Final

from paymaster.authority import PriceContext, Priced
from paymaster.config import ConnectorConfig, Settings
from paymaster.core import budgets as windows
from paymaster.core import policy as pol
from paymaster.core.pricing import (
    LLM_OUTPUT_FIELDS,
    ConnectorPricing,
    FxTable,
    ModelPrice,
    RateCard,
    TokenUsage,
    llm_cost,
    llm_input_bound,
    llm_output_bound,
    max_output_that_fits,
    worst_case_nanos,
)
from paymaster.errors import InvalidRequest, PriceUnknown
from paymaster.money import MAX_NANOS, ceil_div

__all__ = [
    "MIN_CAPPED_OUTPUT",
    "TIER_HOLD_LOOKAHEAD",
    "GatewayCall",
    "LlmQuote",
    "Pricer",
    "Quote",
    "Quoter",
]

TIER_HOLD_LOOKAHEAD: Final = 256
"""How many call numbers past the current count a tiered hold covers (the gateway's own
concurrency bound: its worker-thread limiter)."""

MIN_CAPPED_OUTPUT: Final = 16
"""The smallest output bound ``allow_with_caps`` lowers a call to; below it the call is priced
as asked and the budget denies it (a shorter answer is no answer)."""

_PROVIDER_HINTS: Final = frozenset({"openai", "anthropic"})


@dataclass(frozen=True, slots=True)
class GatewayCall:
    """The parts of a proxied request that pricing reads."""

    connector: ConnectorConfig
    method: str
    path: str  # the upstream path, "/" + what followed /proxy/{host}/
    body: bytes


@dataclass(frozen=True, slots=True)
class LlmQuote:
    """How an LLM call was priced: the model's price and the bounds held for."""

    model: str
    price: ModelPrice
    input_tokens: int
    output_tokens: int
    provider: str | None


@dataclass(frozen=True, slots=True)
class Quote:
    """The gateway's price of one call, kept for metering after the reserve.

    ``basis``: ``connector`` (its ``pricing``), ``llm`` (the rate card) or ``fallback``
    (``on_price_unknown``). ``amount`` is the hold in the authority's currency.
    ``send_body`` is the body to forward when pricing rewrote it (``allow_with_caps``).
    """

    basis: str
    amount: int
    quantity: str
    unit: str
    decision: str = "allow"
    tier_key: str | None = None
    pricing: ConnectorPricing | None = None
    unit_amount: int = 0  # the per-unit part, in the connector's currency
    llm: LlmQuote | None = None
    send_body: bytes | None = None
    capped_max_tokens: int | None = None
    request_json: Mapping[str, Any] | None = field(default=None, repr=False)


class Pricer:
    """Holds the rate card, the FX table and the connectors' pricing, parsed once."""

    def __init__(self, settings: Settings, *, now: datetime | None = None) -> None:
        built = now or datetime.now(UTC)
        self.currency = settings.currency
        self.card = RateCard.from_config(settings.prices or None, now_default=built)
        self.fx = FxTable.from_config(settings.fx or None, now_default=built)
        self.connectors: dict[str, ConnectorPricing] = {
            c.id: ConnectorPricing.from_config(
                c.pricing, default_currency=settings.currency, field=f"connectors.{c.id}.pricing"
            )
            for c in settings.connectors
            if c.pricing is not None
        }

    # ------------------------------------------------------------ conversions

    def to_budget(self, nanos: int, currency: str, now: datetime) -> int:
        """``nanos`` of ``currency`` in the authority's currency, rounded up."""
        return self.fx.convert(nanos, currency, self.currency, now)

    def from_budget_floor(self, nanos: int, currency: str, now: datetime) -> int:
        """The most of ``currency`` that converts to at most ``nanos`` of the authority's currency."""
        if currency == self.currency:
            return nanos
        ratio = self.fx.ratio(currency, self.currency)
        if ratio is None:
            return 0
        num, den = ratio
        candidate = nanos * den // num
        while candidate > 0 and self.to_budget(candidate, currency, now) > nanos:
            candidate -= 1
        return candidate

    def model_price(self, model: str, provider: str | None, now: datetime) -> ModelPrice:
        """The rate card's price of ``model`` (fresh), or ``price_unknown``."""
        price = self.card.lookup(model, provider=provider)
        if price is None:
            raise PriceUnknown(f"no price for model {model!r}: add it to [prices.models]")
        self.card.check_fresh(now)
        return price

    # ------------------------------------------------------------ (a) API reserves

    def price_estimate(
        self, connector: ConnectorConfig, usage_estimate: Mapping[str, Any], now: datetime
    ) -> int:
        """The worst case of an API reserve's ``usage_estimate`` in the authority's currency:
        ``{model, input_tokens | input_text_bytes, max_output_tokens}`` or ``{units, unit}``."""
        if usage_estimate.get("model") is not None:
            provider = connector.usage if connector.usage in _PROVIDER_HINTS else None
            price = self.model_price(str(usage_estimate["model"]), provider, now)
            input_tokens = _count(usage_estimate, "input_tokens")
            if input_tokens is None:
                # every token is at least one byte: the byte count bounds the tokens
                input_tokens = _count(usage_estimate, "input_text_bytes") or 0
            output = _count(usage_estimate, "max_output_tokens")
            if output is None:
                output = llm_output_bound({}, price)
            if output is None:
                raise PriceUnknown(
                    "usage_estimate has no max_output_tokens and [prices.models] gives the model"
                    " no max_output"
                )
            return self._checked(
                self.to_budget(worst_case_nanos(price, input_tokens, output), price.currency, now)
            )
        if usage_estimate.get("units") is not None:
            pricing = self.connectors.get(connector.id)
            if pricing is None:
                raise PriceUnknown(f"connector {connector.id} has no pricing to price units with")
            units = _units(usage_estimate["units"])
            unit = usage_estimate.get("unit")
            raw = self._units_price(pricing, units, unit if isinstance(unit, str) else None, connector.id)
            return self._checked(self.to_budget(raw, pricing.currency, now))
        raise PriceUnknown("usage_estimate names neither a model nor units")

    def _units_price(self, pricing: ConnectorPricing, units: Fraction, unit: str | None, cid: str) -> int:
        dearest_call = max((tier.price for tier in pricing.per_call), default=0)
        if unit in ("call", "calls") and pricing.per_call:
            return ceil_div(units.numerator * dearest_call, units.denominator)
        per_unit = pricing.per_unit
        if per_unit is not None and (unit is None or unit == per_unit.unit):
            blocks = ceil_div(units.numerator, units.denominator * per_unit.per)
            return blocks * per_unit.price + dearest_call
        if per_unit is None and unit is None and pricing.per_call:
            return ceil_div(units.numerator * dearest_call, units.denominator)
        priced_in = per_unit.unit if per_unit is not None else "call"
        raise PriceUnknown(f"connector {cid} is priced per {priced_in}, not per {unit}")

    # ------------------------------------------------------------ (b) actual cost

    def actual_cost(
        self,
        connector: ConnectorConfig | None,
        usage: TokenUsage | Mapping[str, Any],
        *,
        now: datetime,
        model: str | None = None,
        provider: str | None = None,
    ) -> int | None:
        """The cost of reported usage in the authority's currency; None when it cannot be
        priced (the caller then charges the hold, flagged ``estimated``).

        ``usage`` is a :class:`paymaster.usage.Usage` (``model`` names the model when the
        usage does not), or the commit shape ``{model, input_tokens, output_tokens,
        cached_input_tokens}`` / ``{units, unit}``.
        """
        if isinstance(usage, Mapping):
            if usage.get("units") is not None:
                if connector is None or connector.id not in self.connectors:
                    return None
                pricing = self.connectors[connector.id]
                unit = usage.get("unit")
                try:
                    units = _units(usage["units"])
                    raw = self._units_price(
                        pricing, units, unit if isinstance(unit, str) else None, connector.id
                    )
                    return self.to_budget(raw, pricing.currency, now)
                except (PriceUnknown, InvalidRequest):
                    return None
            model = usage.get("model") if isinstance(usage.get("model"), str) else model
            usage = _MappingUsage(usage)
        else:
            model = getattr(usage, "model", None) or model
        if not model:
            return None
        if provider is None and connector is not None and connector.usage in _PROVIDER_HINTS:
            provider = connector.usage
        price = self.card.lookup(model, provider=provider)
        if price is None:
            return None
        try:
            return self.to_budget(llm_cost(price, usage), price.currency, now)
        except (PriceUnknown, InvalidRequest):
            return None

    def llm_charge(self, quote: LlmQuote, usage: TokenUsage, now: datetime) -> int | None:
        """The cost of an LLM call's reported usage: at the reported model's price when the
        card knows it, else at the price it was held with."""
        reported = getattr(usage, "model", None)
        tier = getattr(usage, "service_tier", None)
        price: ModelPrice | None = None
        if isinstance(reported, str) and reported:
            price = self.card.lookup(
                reported, provider=quote.provider, service_tier=tier if isinstance(tier, str) else None
            )
        if price is None:
            price = quote.price
        try:
            return self.to_budget(llm_cost(price, usage), price.currency, now)
        except (PriceUnknown, InvalidRequest):
            return None

    def connector_charge(self, quote: Quote, calls_counted: int | None, now: datetime) -> int:
        """A connector-priced call's charge: its tier price as counted at commit (the count
        includes the call itself) plus its per-unit price, never above the hold."""
        pricing = quote.pricing
        if pricing is None:
            return quote.amount
        calls_before = max((calls_counted or 1) - 1, 0) if quote.tier_key else 0
        try:
            raw = pricing.price_per_call(calls_before) + quote.unit_amount
            charge = self.to_budget(raw, pricing.currency, now)
        except (PriceUnknown, InvalidRequest):
            return quote.amount
        return min(charge, quote.amount)

    # ------------------------------------------------------------ (c) the gateway

    def quoter(self, call: GatewayCall, *, nonce: str) -> Quoter:
        return Quoter(self, call, nonce)

    @staticmethod
    def _checked(amount: int) -> int:
        if amount > MAX_NANOS:
            raise PriceUnknown("the worst case of this call is absurdly large")
        return amount


class Quoter:
    """The gateway's pricing step (step 7) for one request.

    The authority calls it with the call's policies and budget path, possibly more than once
    (it re-plans when a policy changed under it); the last :class:`Quote` is kept in
    :attr:`quote` for metering. ``nonce`` is echoed in the reserve answer, so that the gateway
    can tell its own reservation from the replay of an earlier request's idempotency key.
    """

    def __init__(self, pricer: Pricer, call: GatewayCall, nonce: str) -> None:
        self.pricer = pricer
        self.call = call
        self.nonce = nonce
        self.quote: Quote | None = None
        self._json: Mapping[str, Any] | bool | None = False  # False: not parsed yet

    def __call__(self, ctx: PriceContext) -> Priced:
        quote = self._price(ctx)
        self.quote = quote
        extra: dict[str, Any] = {"gateway_request": self.nonce}
        if quote.capped_max_tokens is not None:
            extra["capped_max_tokens"] = quote.capped_max_tokens
        return Priced(
            amount=quote.amount,
            quantity=quote.quantity,
            unit=quote.unit,
            tier_key=quote.tier_key,
            decision=quote.decision,
            extra_response=extra,
        )

    # -- the three ways, in order

    def _price(self, ctx: PriceContext) -> Quote:
        connector = self.call.connector
        pricing = self.pricer.connectors.get(connector.id)
        try:
            if pricing is not None:
                return self._connector_quote(ctx, pricing)
            body = self.request_json()
            if body is not None and isinstance(body.get("model"), str):
                return self._llm_quote(ctx, body)
            raise PriceUnknown(
                f"{self.call.method} {self.call.path} on connector {connector.id} cannot be priced:"
                " the connector has no pricing and the request names no model of the rate card"
            )
        except PriceUnknown:
            fallback = _fallback_amount(ctx.policies)
            if fallback is None:
                raise
            return Quote(
                basis="fallback", amount=fallback, quantity="1", unit="call", request_json=self.request_json()
            )

    def request_json(self) -> Mapping[str, Any] | None:
        """The request body as a JSON object, or None (not JSON, not an object)."""
        if self._json is False:
            self._json = _json_object(self.call.body)
        return self._json if isinstance(self._json, Mapping) else None

    def _connector_quote(self, ctx: PriceContext, pricing: ConnectorPricing) -> Quote:
        connector = self.call.connector
        unit_amount, quantity, unit = 0, 1, "call"
        if pricing.per_unit is not None:
            body = self.request_json()
            if body is None:
                raise PriceUnknown(
                    f"connector {connector.id} is priced per {pricing.per_unit.unit} of the JSON field"
                    f" {pricing.per_unit.field!r}; this request has no JSON body"
                )
            try:
                unit_amount, quantity, unit = pricing.price_units(body)
            except InvalidRequest as exc:
                raise PriceUnknown(f"connector {connector.id}: {exc.message}") from None
        tier_key: str | None = None
        if pricing.tiered:
            window = windows.window_for(pricing.period, ctx.now)
            tier_key = f"{connector.id}/{window.key or 'total'}"
            calls_before = _tier_count(ctx, tier_key)
            per_call = _dearest_tier(pricing, calls_before)
        else:
            per_call = pricing.price_per_call(0)
        amount = self.pricer.to_budget(per_call + unit_amount, pricing.currency, ctx.now)
        return Quote(
            basis="connector",
            amount=self.pricer._checked(amount),
            quantity=str(quantity),
            unit=unit or "call",
            tier_key=tier_key,
            pricing=pricing,
            unit_amount=unit_amount,
        )

    def _llm_quote(self, ctx: PriceContext, body: Mapping[str, Any]) -> Quote:
        connector = self.call.connector
        provider = connector.usage if connector.usage in _PROVIDER_HINTS else None
        model = str(body["model"])
        tier = body.get("service_tier")
        price = self.pricer.card.lookup(
            model, provider=provider, service_tier=tier if isinstance(tier, str) else None
        )
        if price is None:
            raise PriceUnknown(f"no price for model {model!r}: add it to [prices.models]")
        self.pricer.card.check_fresh(ctx.now)
        input_tokens = llm_input_bound(body)
        output_tokens = llm_output_bound(body, price)
        if output_tokens is None:
            raise PriceUnknown(
                f"the request to {model!r} has no max_tokens and [prices.models] gives the model"
                " no max_output"
            )
        amount = self._llm_amount(price, input_tokens, output_tokens, ctx.now)
        llm = LlmQuote(model, price, input_tokens, output_tokens, provider)
        quote = Quote(
            basis="llm",
            amount=amount,
            quantity=str(input_tokens + output_tokens),
            unit="tokens",
            llm=llm,
            request_json=body,
        )
        if price.output is None or not ctx.policies or not all(p.allow_with_caps for p in ctx.policies):
            return quote
        return self._capped(ctx, quote, body) or quote

    def _llm_amount(self, price: ModelPrice, input_tokens: int, output_tokens: int, now: datetime) -> int:
        raw = worst_case_nanos(price, input_tokens, output_tokens)
        return self.pricer._checked(self.pricer.to_budget(raw, price.currency, now))

    def _capped(self, ctx: PriceContext, quote: Quote, body: Mapping[str, Any]) -> Quote | None:
        """``allow_with_caps``: the largest output bound whose worst case fits every enforced
        budget of the path and the per-call maximum; None when the call fits as asked, or
        when not even :data:`MIN_CAPPED_OUTPUT` tokens fit (the budget then denies it)."""
        assert quote.llm is not None
        connector = self.call.connector
        bounds = [pol.per_call_limit(ctx.policies, connector.id, ctx.category), ctx.remaining()]
        known = [b for b in bounds if b is not None]
        if not known:
            return None
        room = min(known)
        if quote.amount <= room or room <= 0:
            return None
        llm = quote.llm
        choices = _choices(body)
        room_in_price = self.pricer.from_budget_floor(room, llm.price.currency, ctx.now)
        fits = max_output_that_fits(llm.price, llm.input_tokens, room_in_price) // choices
        requested = llm.output_tokens // choices
        fits = min(fits, requested)
        while (
            fits >= MIN_CAPPED_OUTPUT
            and self._llm_amount(llm.price, llm.input_tokens, fits * choices, ctx.now) > room
        ):
            fits -= 1  # a rounding step of the FX conversion
        if fits < MIN_CAPPED_OUTPUT or fits >= requested:
            return None
        output_tokens = fits * choices
        rewritten = _with_output_bound(body, fits, self.call.path)
        return replace(
            quote,
            amount=self._llm_amount(llm.price, llm.input_tokens, output_tokens, ctx.now),
            quantity=str(llm.input_tokens + output_tokens),
            decision="allow_with_caps",
            llm=replace(llm, output_tokens=output_tokens),
            send_body=json.dumps(rewritten, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
            capped_max_tokens=fits,
            request_json=rewritten,
        )


# ---------------------------------------------------------------- helpers


class _MappingUsage:
    """The commit shape ``{input_tokens, output_tokens, cached_input_tokens}`` as TokenUsage."""

    def __init__(self, usage: Mapping[str, Any]) -> None:
        self.input_tokens = _count(usage, "input_tokens") or 0
        self.output_tokens = _count(usage, "output_tokens") or 0
        self.cached_input_tokens = min(_count(usage, "cached_input_tokens") or 0, self.input_tokens)
        self.cache_write_tokens = 0
        self.cache_write_1h_tokens = 0
        self.reasoning_tokens = 0


def _count(mapping: Mapping[str, Any], name: str) -> int | None:
    value = mapping.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _units(value: Any) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidRequest("units must be a non-negative integer or decimal string")
    try:
        units = Fraction(value)
    except (ValueError, ZeroDivisionError):
        raise InvalidRequest(f"units {value!r} is not a number") from None
    if units < 0:
        raise InvalidRequest("units must not be negative")
    return units


def _choices(body: Mapping[str, Any]) -> int:
    count = 1
    for name in ("n", "best_of"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > count:
            count = value
    return count


def _json_object(raw: bytes) -> Mapping[str, Any] | None:
    head = raw.lstrip()[:1]
    if head != b"{":
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _with_output_bound(body: Mapping[str, Any], tokens: int, path: str) -> dict[str, Any]:
    """The body with every output bound it names set to ``tokens``; when it names none (the
    card's ``max_output`` bounded it), the field of its API is added."""
    rewritten = dict(body)
    present = [name for name in LLM_OUTPUT_FIELDS if body.get(name) is not None]
    if not present:
        route = path.split("?", 1)[0].rstrip("/")
        if route.endswith("/responses"):
            present = ["max_output_tokens"]
        elif route.endswith("/chat/completions"):
            present = ["max_completion_tokens"]
        else:
            present = ["max_tokens"]  # Anthropic messages, legacy completions
    for name in present:
        rewritten[name] = tokens
    return rewritten


def _fallback_amount(policies: Sequence[pol.Policy]) -> int | None:
    """``on_price_unknown`` of the chain, strictest first: None (deny) when any policy denies
    (or there is no policy: the default denies), else the largest amount."""
    if not policies:
        return None
    amounts: list[int] = []
    for policy in policies:
        if not isinstance(policy.on_price_unknown, int):
            return None
        amounts.append(policy.on_price_unknown)
    return max(amounts)


def _tier_count(ctx: PriceContext, tier_key: str) -> int:
    row = ctx.authority.store.read(
        lambda tx: tx.one("SELECT calls FROM tier_counters WHERE tier_key = ?", (tier_key,))
    )
    return int(row["calls"]) if row is not None else 0


def _dearest_tier(pricing: ConnectorPricing, calls_before: int) -> int:
    """The dearest per-call price among the next :data:`TIER_HOLD_LOOKAHEAD` call numbers;
    ``price_unknown`` when the next call is past the last priced tier."""
    dearest = pricing.price_per_call(calls_before)
    first, last = calls_before + 1, calls_before + TIER_HOLD_LOOKAHEAD
    start = 1
    for tier in pricing.per_call:
        if start > last:
            break
        if tier.up_to is None or tier.up_to >= first:
            dearest = max(dearest, tier.price)
        if tier.up_to is None:
            break
        start = tier.up_to + 1
    return dearest
