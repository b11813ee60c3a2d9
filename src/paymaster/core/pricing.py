"""Rate cards, tiers and FX; the worst-case estimate of a call and its actual cost from usage.

Everything here is exact integer arithmetic (see :mod:`paymaster.money`): a price per million
tokens is held as *nanos per million tokens*, and each amount is rounded up once, at the end,
against the spender.

Built-in LLM prices come from the ``genai-prices`` package's bundled snapshot
(``genai_prices.data.providers``), imported lazily on the first lookup that needs it. Nothing is
ever fetched: this module never starts ``genai_prices.UpdatePrices`` and never reads the
package's process-wide snapshot (which an updater started elsewhere could replace), only the
data shipped inside the installed wheel. The defaults change when the package is upgraded.

Rules where PROTOCOL.md is silent:

- A ``[prices]`` table without ``updated_at`` counts as updated at ``now_default`` (the moment
  the card was built); without ``max_age`` the card never goes stale. The built-in defaults
  carry no date of their own: they are as fresh as the installed package.
- A configured model replaces the defaults' prices field by field; once it sets any price, the
  defaults' long-context tiers no longer apply to it (the operator's flat price is the price).
- Date-conditional default prices are resolved at ``now_default``; time-of-day prices (off-peak
  discounts) are not trusted: the dearest of them is used.
- Tiered (long-context) default prices follow genai-prices' cliff model: every token of a call
  whose input exceeds a tier's threshold pays that tier's price.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any, Final, Protocol

from paymaster.errors import FxRateUnknown, InvalidAmount, InvalidRequest, PriceStale, PriceUnknown
from paymaster.money import MAX_NANOS, ceil_div, check_currency, decimal_to_nanos_ceil, parse_nanos

__all__ = [
    "LLM_INPUT_FIELDS",
    "LLM_OUTPUT_FIELDS",
    "PERIODS",
    "UNBOUNDED_OUTPUT",
    "CallTier",
    "ConnectorPricing",
    "FxTable",
    "LlmEstimate",
    "ModelPrice",
    "PriceTier",
    "RateCard",
    "TokenUsage",
    "UnitPrice",
    "llm_cost",
    "llm_input_bound",
    "llm_output_bound",
    "llm_worst_case",
    "max_output_that_fits",
    "parse_duration",
    "parse_timestamp",
    "worst_case_nanos",
]

TOKENS_PER_PRICE: Final = 1_000_000
"""Prices are per million tokens."""

LLM_INPUT_FIELDS: Final = (
    "messages",
    "input",
    "prompt",
    "system",
    "instructions",
    "tools",
    "tool_choice",
    "response_format",
)
"""The request fields whose compact JSON bounds the input tokens (PROTOCOL.md, Gateway)."""

LLM_OUTPUT_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")
"""The request fields that bound the output tokens; the largest present wins."""

PERIODS: Final = frozenset({"hour", "day", "week", "month", "total"})

UNBOUNDED_OUTPUT: Final = 2**31 - 1
"""What :func:`max_output_that_fits` answers when output is free and the model has no ``max_output``."""

_MAX_MODEL_ID = 256
_LOOKUP_CACHE_SIZE = 4096
_PRICE_FIELDS: Final = ("input", "output", "cached_input", "cache_write", "cache_write_1h", "reasoning")
_MODEL_KEYS: Final = frozenset({*_PRICE_FIELDS, "max_output"})
_PRICES_KEYS: Final = frozenset({"updated_at", "max_age", "currency", "models"})
_DATE_SUFFIX_RE = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$", re.ASCII)
_DURATION_RE = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", re.ASCII)
_RATE_RE = re.compile(r"^\d{1,12}(?:\.\d{1,18})?$", re.ASCII)
_PAIR_RE = re.compile(r"^([A-Z]{3})/([A-Z]{3})$")


# --------------------------------------------------------------------------- small parsers


def parse_duration(value: Any, *, field: str = "max_age") -> timedelta:
    """``"24h"``, ``"7d"``, ``"90m"``, ``"30s"``, ``"2w"`` or a sum (``"1h30m"``) as a timedelta > 0."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f'{field} must be a duration string such as "24h", not {value!r}')
    match = _DURATION_RE.match(value)
    if match is None:
        raise InvalidRequest(f'{field} {value!r} is not a duration such as "24h", "7d" or "90m"')
    weeks, days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    delta = timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
    if delta <= timedelta(0):
        raise InvalidRequest(f"{field} {value!r} must be longer than zero")
    return delta


def parse_timestamp(value: Any, *, field: str = "updated_at") -> datetime:
    """An RFC 3339 time with an offset (a string, or the datetime a TOML parser already made)."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidRequest(f"{field} {value!r} is not an RFC 3339 time") from exc
    else:
        raise InvalidRequest(f"{field} must be an RFC 3339 time, not {type(value).__name__}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidRequest(f"{field} {value!r} needs a time zone offset (e.g. Z)")
    return parsed


def _aware(now: datetime, field: str = "now") -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"{field} must be timezone-aware")
    return now


def _table(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{field} must be a table, not {type(value).__name__}")
    return value


def _unknown_keys(table: Mapping[str, Any], allowed: frozenset[str], field: str) -> None:
    extra = sorted(str(k) for k in table if k not in allowed)
    if extra:
        raise InvalidRequest(
            f"{field}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}"
        )


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequest(f"{field} must be a whole number > 0, not {value!r}")
    return value


def _max_opt(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# --------------------------------------------------------------------------- model prices


@dataclass(frozen=True, slots=True)
class PriceTier:
    """Prices replacing the base ones for every token of a call whose input exceeds ``above_input_tokens``."""

    above_input_tokens: int
    input: int
    output: int | None
    cached_input: int | None = None
    cache_write: int | None = None
    cache_write_1h: int | None = None
    reasoning: int | None = None


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's per-token prices, in nanos of ``currency`` per million tokens.

    ``output`` is None for an input-only model (embeddings). ``cached_input``, ``cache_write``
    and ``cache_write_1h`` are None where the card has none: such tokens are then billed at the
    input price (cache writes with a one-hour TTL at the ``cache_write`` price). ``reasoning``
    defaults to the output price. ``max_output`` is the model's largest output, in tokens.
    """

    input: int
    output: int | None
    cached_input: int | None = None
    cache_write: int | None = None
    reasoning: int | None = None
    max_output: int | None = None
    cache_write_1h: int | None = None
    currency: str = "USD"
    tiers: tuple[PriceTier, ...] = ()
    source: str = "config"

    def __post_init__(self) -> None:
        for name in _PRICE_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer of nanos, not {value!r}")
        if self.reasoning is None and self.output is not None:
            object.__setattr__(self, "reasoning", self.output)
        if self.max_output is not None and (isinstance(self.max_output, bool) or self.max_output < 0):
            raise ValueError("max_output must be a non-negative integer")
        tiers = tuple(sorted(self.tiers, key=lambda t: t.above_input_tokens))
        object.__setattr__(self, "tiers", tiers)

    def at(self, input_tokens: int) -> ModelPrice:
        """The flat prices that apply to a call with ``input_tokens`` input tokens in all."""
        chosen: PriceTier | None = None
        for tier in self.tiers:
            if input_tokens > tier.above_input_tokens:
                chosen = tier
        if chosen is None:
            return self if not self.tiers else replace(self, tiers=())
        return replace(
            self,
            input=chosen.input,
            output=chosen.output,
            cached_input=chosen.cached_input,
            cache_write=chosen.cache_write,
            cache_write_1h=chosen.cache_write_1h,
            reasoning=chosen.reasoning,
            tiers=(),
        )

    def worst_within(self, input_tokens: int) -> ModelPrice:
        """Flat prices, each the dearest of every tier a call of up to ``input_tokens`` input may reach."""
        worst = replace(self, tiers=())
        for tier in self.tiers:
            if tier.above_input_tokens < input_tokens:
                worst = replace(
                    worst,
                    input=max(worst.input, tier.input),
                    output=_max_opt(worst.output, tier.output),
                    cached_input=_max_opt(worst.cached_input, tier.cached_input),
                    cache_write=_max_opt(worst.cache_write, tier.cache_write),
                    cache_write_1h=_max_opt(worst.cache_write_1h, tier.cache_write_1h),
                    reasoning=_max_opt(worst.reasoning, tier.reasoning),
                )
        return worst

    @property
    def input_rate_max(self) -> int:
        """The dearest price any input token can pay (cache writes included), ignoring tiers."""
        rate = self.input
        for value in (self.cached_input, self.cache_write, self.cache_write_1h):
            if value is not None:
                rate = max(rate, value)
        return rate

    @property
    def output_rate_max(self) -> int | None:
        """The dearest price any output token can pay (reasoning included), ignoring tiers."""
        if self.output is None:
            return None
        return max(self.output, self.reasoning if self.reasoning is not None else self.output)


# A price field as a step function of a call's input tokens: (base, ((above, price), ...)).
_Steps = tuple[int, tuple[tuple[int, int], ...]]


def _step_at(steps: _Steps, input_tokens: int) -> int:
    base, tiers = steps
    value = base
    for above, price in tiers:
        if input_tokens > above:
            value = price
    return value


def _steps_max(a: _Steps, b: _Steps) -> _Steps:
    thresholds = sorted({above for above, _ in a[1]} | {above for above, _ in b[1]})
    return (max(a[0], b[0]), tuple((t, max(_step_at(a, t + 1), _step_at(b, t + 1))) for t in thresholds))


def _price_from_steps(
    steps: Mapping[str, _Steps], *, max_output: int | None, currency: str, source: str
) -> ModelPrice | None:
    base = {name: steps[name][0] if name in steps else None for name in _PRICE_FIELDS}
    base_input = base["input"]
    if base_input is None:
        return None
    thresholds = sorted({above for s in steps.values() for above, _ in s[1]})
    tiers = []
    for t in thresholds:
        values = {name: _step_at(steps[name], t + 1) if name in steps else None for name in _PRICE_FIELDS}
        tier_input = values["input"]
        if tier_input is None:
            continue
        tiers.append(
            PriceTier(
                above_input_tokens=t,
                input=tier_input,
                output=values["output"],
                cached_input=values["cached_input"],
                cache_write=values["cache_write"],
                cache_write_1h=values["cache_write_1h"],
                reasoning=values["reasoning"] if values["reasoning"] is not None else values["output"],
            )
        )
    return ModelPrice(
        input=base_input,
        output=base["output"],
        cached_input=base["cached_input"],
        cache_write=base["cache_write"],
        reasoning=base["reasoning"],
        max_output=max_output,
        cache_write_1h=base["cache_write_1h"],
        currency=currency,
        tiers=tuple(tiers),
        source=source,
    )


# --------------------------------------------------------------------------- genai-prices (offline)

_GP_KEYS: Final = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cached_input": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "cache_write_1h": "cache_write_1h_mtok",
    "reasoning": "output_reasoning_mtok",
}


@cache
def _bundled_providers() -> tuple[Any, ...]:
    """The provider list shipped inside the installed genai-prices wheel (no network, ever)."""
    from genai_prices.data import providers  # lazy: core stays importable without it

    return tuple(providers)


def _gp_nanos(value: Any) -> int:
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
        raise ValueError(f"unexpected genai-prices price {value!r}")
    return decimal_to_nanos_ceil(value)


def _gp_steps(value: Any) -> _Steps | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return (_gp_nanos(value), ())
    base = getattr(value, "base", None)
    tiers = getattr(value, "tiers", None)
    if base is None or tiers is None:
        return None
    return (_gp_nanos(base), tuple(sorted((int(t.start), _gp_nanos(t.price)) for t in tiers)))


def _gp_price_steps(model_price: Any) -> dict[str, _Steps]:
    steps: dict[str, _Steps] = {}
    for name, key in _GP_KEYS.items():
        converted = _gp_steps(getattr(model_price, key, None))
        if converted is not None:
            steps[name] = converted
    return steps


def _merge_max(a: dict[str, _Steps], b: Mapping[str, _Steps]) -> dict[str, _Steps]:
    merged = dict(a)
    for name, steps in b.items():
        merged[name] = _steps_max(merged[name], steps) if name in merged else steps
    return merged


def _gp_resolve(model_info: Any, at: datetime, service_tier: str | None) -> dict[str, _Steps]:
    from genai_prices.types import StartDateConstraint, TimeOfDateConstraint

    prices = model_info.prices
    if isinstance(prices, list):
        if not prices:
            return {}
        chosen = 0
        for index in range(len(prices) - 1, -1, -1):
            constraint = prices[index].constraint
            if constraint is None or (isinstance(constraint, StartDateConstraint) and constraint.active(at)):
                chosen = index
                break
        steps = _gp_price_steps(prices[chosen].prices)
        # Time-of-day prices (peak / off-peak) that supersede the chosen one: bill the dearest.
        for later in prices[chosen + 1 :]:
            if isinstance(later.constraint, TimeOfDateConstraint):
                steps = _merge_max(steps, _gp_price_steps(later.prices))
    else:
        steps = _gp_price_steps(prices)
    if service_tier:
        overrides: dict[str, _Steps] = {}
        for variant in model_info.price_variants or ():
            if variant.when != {"service_tier": service_tier}:
                continue
            constraint = variant.constraint
            if constraint is not None and not (
                isinstance(constraint, StartDateConstraint) and constraint.active(at)
            ):
                continue
            for name, value in _gp_price_steps(variant.prices).items():
                overrides.setdefault(name, value)
        steps.update(overrides)
    return steps


def _gp_find(model: str, provider_id: str | None) -> tuple[str, Any] | None:
    """(canonical model id, genai-prices ModelInfo) for a model reference, or None."""
    providers = _bundled_providers()
    ref = model.lower()
    provider: Any = None
    if provider_id:
        wanted = provider_id.lower().strip()
        provider = next((p for p in providers if p.id == wanted), None)
    if provider is None and "/" in ref:
        prefix, rest = ref.split("/", 1)
        prefixed = next((p for p in providers if p.id == prefix), None)
        if prefixed is not None and rest:
            provider, ref = prefixed, rest
    if provider is None:
        provider = next(
            (p for p in providers if p.model_match is not None and p.model_match.is_match(ref)),
            None,
        )
    if provider is None:
        # First-party providers (those that claim model names) whose naming rule misses some of
        # their own models, e.g. OpenAI's "text-embedding-3-small".
        for candidate in providers:
            if candidate.model_match is not None and (info := candidate.find_model(ref)) is not None:
                return str(info.id), info
        return None
    info = provider.find_model(ref, all_providers=list(providers))
    if info is None:
        return None
    return str(info.id), info


# --------------------------------------------------------------------------- rate card


@dataclass(frozen=True, slots=True)
class _Configured:
    prices: Mapping[str, int]
    max_output: int | None


class RateCard:
    """The ``[prices]`` rate card layered over the built-in genai-prices defaults."""

    def __init__(
        self,
        models: Mapping[str, _Configured] | None = None,
        *,
        updated_at: datetime,
        max_age: timedelta | None = None,
        currency: str = "USD",
        resolve_at: datetime | None = None,
        builtin_defaults: bool = True,
    ) -> None:
        self.updated_at = _aware(updated_at, "updated_at")
        self.max_age = max_age
        self.currency = check_currency(currency)
        self.resolve_at = _aware(resolve_at or updated_at, "resolve_at")
        self.builtin_defaults = builtin_defaults
        self._models: dict[str, _Configured] = dict(models or {})
        self._lower: dict[str, _Configured] = {k.lower(): v for k, v in self._models.items()}
        self._cache: dict[tuple[str, str | None, str | None], ModelPrice | None] = {}

    @classmethod
    def from_config(
        cls,
        prices_table: Mapping[str, Any] | None,
        *,
        now_default: datetime,
        builtin_defaults: bool = True,
    ) -> RateCard:
        """Build the card from the parsed ``[prices]`` table (None: the defaults alone).

        ``now_default`` is the card's ``updated_at`` when the table gives none, and the instant
        at which date-conditional default prices are resolved.
        """
        now_default = _aware(now_default, "now_default")
        table = _table(prices_table if prices_table is not None else {}, "prices")
        _unknown_keys(table, _PRICES_KEYS, "prices")
        updated_at = (
            parse_timestamp(table["updated_at"], field="prices.updated_at")
            if "updated_at" in table
            else now_default
        )
        max_age = parse_duration(table["max_age"], field="prices.max_age") if "max_age" in table else None
        currency = check_currency(table.get("currency", "USD"))
        models: dict[str, _Configured] = {}
        for name, entry in _table(table.get("models", {}), "prices.models").items():
            field = f"prices.models.{name}"
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"{field}: a model id must be a non-empty string")
            entry = _table(entry, field)
            _unknown_keys(entry, _MODEL_KEYS, field)
            prices = {
                key: parse_nanos(entry[key], field=f"{field}.{key}") for key in _PRICE_FIELDS if key in entry
            }
            max_output = (
                _positive_int(entry["max_output"], f"{field}.max_output") if "max_output" in entry else None
            )
            models[name] = _Configured(prices=prices, max_output=max_output)
        card = cls(
            models,
            updated_at=updated_at,
            max_age=max_age,
            currency=currency,
            resolve_at=now_default,
            builtin_defaults=builtin_defaults,
        )
        for name, configured in models.items():
            if "input" not in configured.prices and card.lookup(name) is None:
                raise InvalidRequest(
                    f"prices.models.{name}: input is required (the built-in prices do not know this model)"
                )
        return card

    # -- freshness

    @property
    def stale_after(self) -> datetime | None:
        return None if self.max_age is None else self.updated_at + self.max_age

    def check_fresh(self, now: datetime) -> None:
        """Raise ``price_stale`` when the card is older than its ``max_age``."""
        limit = self.stale_after
        if limit is not None and _aware(now) > limit:
            raise PriceStale(
                f"the rate card was updated at {self.updated_at.isoformat()} and is older than its max_age"
                f" ({self.max_age}); update [prices]"
            )

    # -- lookup

    def lookup(
        self, model: str, *, provider: str | None = None, service_tier: str | None = None
    ) -> ModelPrice | None:
        """The price of ``model``, or None when neither the card nor the defaults know it.

        Order: the card's exact id (then case-insensitive); the defaults' own matching (aliases
        and dated snapshots such as ``gpt-4o-2024-08-06`` → ``gpt-4o``), with a card entry for
        the canonical id layered over the default; a card entry for the id without its date
        suffix; the default. ``provider`` (a genai-prices provider id such as ``"openai"``)
        narrows the defaults; ``service_tier`` selects the defaults' tier prices (``"priority"``,
        ``"flex"``); the card's own entries apply whatever the tier.
        """
        key = (model, provider, service_tier)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = self._lookup(model, provider, service_tier)
        if len(self._cache) < _LOOKUP_CACHE_SIZE:
            self._cache[key] = found
        return found

    def _lookup(self, model: str, provider: str | None, service_tier: str | None) -> ModelPrice | None:
        if not isinstance(model, str) or not model or len(model) > _MAX_MODEL_ID:
            return None
        configured = self._models.get(model) or self._lower.get(model.lower())
        default_id: str | None = None
        default_steps: dict[str, _Steps] | None = None
        if self.builtin_defaults:
            found = _gp_find(model, provider)
            if found is not None:
                default_id, info = found
                default_steps = _gp_resolve(
                    info, self.resolve_at, service_tier if service_tier != "auto" else None
                )
        if configured is None and default_id is not None:
            configured = self._models.get(default_id) or self._lower.get(default_id.lower())
        if configured is None and default_steps is None:
            stripped = _DATE_SUFFIX_RE.sub("", model)
            if stripped != model:
                configured = self._models.get(stripped) or self._lower.get(stripped.lower())
        default_price = (
            _price_from_steps(default_steps, max_output=None, currency="USD", source="genai-prices")
            if default_steps
            else None
        )
        if configured is None:
            return default_price
        return self._layer(configured, default_price)

    def _layer(self, configured: _Configured, default: ModelPrice | None) -> ModelPrice | None:
        usable = default if default is not None and default.currency == self.currency else None
        if not configured.prices:
            if default is None:
                return None
            max_output = configured.max_output if configured.max_output is not None else default.max_output
            return replace(default, max_output=max_output)
        values: dict[str, int | None] = {}
        for name in _PRICE_FIELDS:
            if name in configured.prices:
                values[name] = configured.prices[name]
            elif name == "reasoning" and "output" in configured.prices:
                values[name] = None  # follows the configured output price
            else:
                values[name] = getattr(usable, name) if usable is not None else None
        base_input = values["input"]
        if base_input is None:
            return None
        return ModelPrice(
            input=base_input,
            output=values["output"],
            cached_input=values["cached_input"],
            cache_write=values["cache_write"],
            reasoning=values["reasoning"],
            max_output=configured.max_output,
            cache_write_1h=values["cache_write_1h"],
            currency=self.currency,
            source="config",
        )


# --------------------------------------------------------------------------- FX


class FxTable:
    """Exchange rates from ``[fx]``: ``"EUR/USD" = "1.08"`` means one EUR is 1.08 USD.

    No triangulation: a pair is converted only by its own rate or the inverse of the reverse
    pair's rate.
    """

    def __init__(
        self,
        rates: Mapping[tuple[str, str], Decimal] | None = None,
        *,
        updated_at: datetime | None = None,
        max_age: timedelta | None = None,
    ) -> None:
        self._rates: dict[tuple[str, str], tuple[int, int]] = {}
        for pair, rate in (rates or {}).items():
            if not rate.is_finite() or rate <= 0:
                raise InvalidAmount(f"fx rate {pair[0]}/{pair[1]} must be > 0")
            self._rates[pair] = rate.as_integer_ratio()
        if max_age is not None and updated_at is None:
            raise InvalidRequest("fx.max_age needs fx.updated_at")
        self.updated_at = _aware(updated_at, "updated_at") if updated_at is not None else None
        self.max_age = max_age

    @classmethod
    def from_config(
        cls, fx_table: Mapping[str, Any] | None, *, now_default: datetime | None = None
    ) -> FxTable:
        """Build from the parsed ``[fx]`` table; ``now_default`` stands in for a missing ``updated_at``."""
        table = _table(fx_table if fx_table is not None else {}, "fx")
        rates: dict[tuple[str, str], Decimal] = {}
        updated_at: datetime | None = None
        max_age: timedelta | None = None
        for key, value in table.items():
            if key == "updated_at":
                updated_at = parse_timestamp(value, field="fx.updated_at")
            elif key == "max_age":
                max_age = parse_duration(value, field="fx.max_age")
            else:
                match = _PAIR_RE.match(str(key))
                if match is None:
                    raise InvalidRequest(f'fx: {key!r} is not a currency pair such as "EUR/USD"')
                base, quote = match.group(1), match.group(2)
                if base == quote:
                    raise InvalidRequest(f"fx: {key!r} converts a currency to itself")
                rates[(base, quote)] = _parse_rate(value, f"fx.{key}")
        if updated_at is None and max_age is not None and now_default is not None:
            updated_at = _aware(now_default, "now_default")
        return cls(rates, updated_at=updated_at, max_age=max_age)

    def ratio(self, from_cur: str, to_cur: str) -> tuple[int, int] | None:
        """The exact rate as (numerator, denominator): ``to = from * n / d``; None when unknown."""
        if from_cur == to_cur:
            return (1, 1)
        direct = self._rates.get((from_cur, to_cur))
        if direct is not None:
            return direct
        reverse = self._rates.get((to_cur, from_cur))
        if reverse is not None:
            return (reverse[1], reverse[0])
        return None

    def check_fresh(self, now: datetime) -> None:
        if self.max_age is None or self.updated_at is None:
            return
        if _aware(now) > self.updated_at + self.max_age:
            raise PriceStale(
                f"the fx table was updated at {self.updated_at.isoformat()} and is older than its max_age"
                f" ({self.max_age}); update [fx]"
            )

    def convert(self, nanos: int, from_cur: str, to_cur: str, now: datetime) -> int:
        """``nanos`` of ``from_cur`` in ``to_cur``, rounded up; ``fx_rate_unknown`` or ``price_stale``."""
        if from_cur == to_cur:
            return nanos
        ratio = self.ratio(from_cur, to_cur)
        if ratio is None:
            raise FxRateUnknown(f"no [fx] rate for {from_cur}/{to_cur} (nor {to_cur}/{from_cur})")
        self.check_fresh(now)
        return ceil_div(nanos * ratio[0], ratio[1])


def _parse_rate(value: Any, field: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str):
        raise InvalidAmount(f'{field} must be a decimal string such as "1.08", not {type(value).__name__}')
    if not _RATE_RE.match(value):
        raise InvalidAmount(f"{field} {value!r} is not a plain decimal string")
    try:
        rate = Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise InvalidAmount(f"{field} {value!r} is not a decimal") from exc
    if rate <= 0:
        raise InvalidAmount(f"{field} must be greater than zero")
    return rate


# --------------------------------------------------------------------------- connector pricing


@dataclass(frozen=True, slots=True)
class CallTier:
    """A volume tier: calls numbered up to ``up_to`` (inclusive, counted in the period) cost ``price``."""

    up_to: int | None
    price: int


_UNIT_MEASURES: Final[dict[str, Callable[[str], int]]] = {
    "characters": len,
    "bytes": lambda text: len(text.encode("utf-8", "surrogatepass")),
}
_UNIT_KEYS: Final = frozenset({"field", "per", "unit", "price"})
_CONNECTOR_KEYS: Final = frozenset({"per_call", "period", "per_unit", "currency"})


@dataclass(frozen=True, slots=True)
class UnitPrice:
    """``price`` per ``per`` units of the length of the request field ``field``, whole blocks rounded up.

    ``unit``: ``characters`` (code points of a string), ``bytes`` (its UTF-8 length) or
    ``items`` (the length of a list). A list of strings sums the lengths of its strings.
    ``field`` may be a dotted path (``"input.text"``).
    """

    field: str
    per: int
    unit: str
    price: int

    def quantity(self, body: Mapping[str, Any]) -> int:
        value: Any = body
        for part in self.field.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise InvalidRequest(f"the request has no {self.field!r} field to price")
            value = value[part]
        if self.unit == "items":
            if isinstance(value, list):
                return len(value)
            if isinstance(value, (str, Mapping)):
                return 1
            raise InvalidRequest(f"the request field {self.field!r} is not a list")
        measure = _UNIT_MEASURES[self.unit]
        if isinstance(value, str):
            return measure(value)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return sum(measure(item) for item in value)
        raise InvalidRequest(f"the request field {self.field!r} is not a string or a list of strings")


@dataclass(frozen=True, slots=True)
class ConnectorPricing:
    """A connector's ``pricing`` table: per-call volume tiers and/or a per-unit price."""

    currency: str
    per_call: tuple[CallTier, ...] = ()
    period: str = "month"
    per_unit: UnitPrice | None = None

    @classmethod
    def from_config(
        cls, table: Mapping[str, Any], *, default_currency: str, field: str = "pricing"
    ) -> ConnectorPricing:
        table = _table(table, field)
        _unknown_keys(table, _CONNECTOR_KEYS, field)
        currency = check_currency(table.get("currency", default_currency))
        period = table.get("period", "month")
        if period not in PERIODS:
            allowed = ", ".join(sorted(PERIODS))
            raise InvalidRequest(f"{field}.period must be one of {allowed}, not {period!r}")
        tiers = _parse_call_tiers(table["per_call"], f"{field}.per_call") if "per_call" in table else ()
        per_unit = _parse_unit_price(table["per_unit"], f"{field}.per_unit") if "per_unit" in table else None
        if not tiers and per_unit is None:
            raise InvalidRequest(f"{field} needs per_call or per_unit")
        return cls(currency=currency, per_call=tiers, period=period, per_unit=per_unit)

    @property
    def tiered(self) -> bool:
        """Whether a call's price depends on the count of calls before it in the period."""
        return len(self.per_call) > 1 or (len(self.per_call) == 1 and self.per_call[0].up_to is not None)

    def price_per_call(self, calls_before: int) -> int:
        """The price of the next call, given ``calls_before`` calls already counted this period.

        0 when the connector has no per-call price; ``price_unknown`` past a last tier that has an
        ``up_to``.
        """
        if calls_before < 0:
            raise ValueError("calls_before must be >= 0")
        if not self.per_call:
            return 0
        number = calls_before + 1
        for tier in self.per_call:
            if tier.up_to is None or number <= tier.up_to:
                return tier.price
        raise PriceUnknown(f"call number {number} of this {self.period} is past the last priced tier")

    def price_units(self, body: Mapping[str, Any]) -> tuple[int, int, str]:
        """(amount in nanos, quantity measured, unit) of the per-unit price; (0, 0, "") without one."""
        if self.per_unit is None:
            return (0, 0, "")
        quantity = self.per_unit.quantity(body)
        blocks = ceil_div(quantity, self.per_unit.per)
        return (blocks * self.per_unit.price, quantity, self.per_unit.unit)

    def price(self, body: Mapping[str, Any], calls_before: int) -> int:
        """The whole price of one call: its tier price plus its per-unit price."""
        return self.price_per_call(calls_before) + self.price_units(body)[0]


def _parse_call_tiers(value: Any, field: str) -> tuple[CallTier, ...]:
    if isinstance(value, str):
        return (CallTier(up_to=None, price=parse_nanos(value, field=field)),)
    if not isinstance(value, Sequence) or not value:
        raise InvalidRequest(f'{field} must be a price ("0.005") or a non-empty list of tiers')
    tiers: list[CallTier] = []
    previous = 0
    for index, raw in enumerate(value):
        where = f"{field}[{index}]"
        entry = _table(raw, where)
        _unknown_keys(entry, frozenset({"up_to", "price"}), where)
        if "price" not in entry:
            raise InvalidRequest(f"{where} needs a price")
        price = parse_nanos(entry["price"], field=f"{where}.price")
        up_to: int | None = None
        if "up_to" in entry:
            up_to = _positive_int(entry["up_to"], f"{where}.up_to")
            if up_to <= previous:
                raise InvalidRequest(f"{where}.up_to must be greater than the previous tier's")
            previous = up_to
        elif index != len(value) - 1:
            raise InvalidRequest(f"{where}: only the last tier may omit up_to")
        tiers.append(CallTier(up_to=up_to, price=price))
    return tuple(tiers)


def _parse_unit_price(value: Any, field: str) -> UnitPrice:
    entry = _table(value, field)
    _unknown_keys(entry, _UNIT_KEYS, field)
    name = entry.get("field")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{field}.field must name a request field")
    per = _positive_int(entry.get("per", 1), f"{field}.per")
    unit = entry.get("unit", "characters")
    if unit not in (*_UNIT_MEASURES, "items"):
        raise InvalidRequest(f"{field}.unit must be characters, bytes or items, not {unit!r}")
    if "price" not in entry:
        raise InvalidRequest(f"{field} needs a price")
    price = parse_nanos(entry["price"], field=f"{field}.price")
    return UnitPrice(field=name, per=per, unit=unit, price=price)


# --------------------------------------------------------------------------- LLM estimate and cost


class TokenUsage(Protocol):
    """What :func:`llm_cost` reads (``paymaster.usage.Usage`` is one).

    ``input_tokens`` includes cached and cache-write tokens; ``output_tokens`` includes the
    reasoning tokens (OpenAI and Anthropic report them so); ``cache_write_1h_tokens`` is the part
    of ``cache_write_tokens`` written with a one-hour TTL.
    """

    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cached_input_tokens(self) -> int: ...
    @property
    def cache_write_tokens(self) -> int: ...
    @property
    def cache_write_1h_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class LlmEstimate:
    """The worst case of an LLM call: its input and output bounds (tokens) and their price."""

    model: str
    input_tokens: int
    output_tokens: int
    amount_nanos: int
    currency: str = "USD"
    price: ModelPrice | None = None


def llm_input_bound(body: Mapping[str, Any]) -> int:
    """UTF-8 byte count of the compact JSON of the request's prompt-bearing fields.

    Every token is at least one byte, and the JSON outweighs the chat framing, so this bounds
    the input tokens from above (PROTOCOL.md, Gateway).
    """
    subset = {name: body[name] for name in LLM_INPUT_FIELDS if body.get(name) is not None}
    if not subset:
        return 0
    try:
        text = json.dumps(subset, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest("the request body is not JSON") from exc
    return len(text.encode("utf-8", "surrogatepass"))


def _whole(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{field} must be a whole number >= {minimum}, not {value!r}")
    return value


def _choices(body: Mapping[str, Any]) -> int:
    """How many completions one request generates (``n``, legacy ``best_of``), each up to the bound."""
    count = 1
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None:
            count = max(count, _whole(value, name, 1))
    return count


def llm_output_bound(body: Mapping[str, Any], price: ModelPrice | None) -> int | None:
    """The output bound in tokens: the request's own bound, else the card's ``max_output``.

    The largest of ``max_tokens``, ``max_completion_tokens`` and ``max_output_tokens`` present
    wins, times ``n`` / ``best_of`` completions. An input-only model (no output price) is bounded
    at 0. None when nothing bounds the output (the caller answers ``price_unknown``).
    """
    bounds = [_whole(body[name], name, 0) for name in LLM_OUTPUT_FIELDS if body.get(name) is not None]
    if bounds:
        bound = max(bounds)
    elif price is not None and price.max_output is not None:
        bound = price.max_output
    elif price is not None and price.output is None:
        return 0
    else:
        return None
    return bound * _choices(body)


def worst_case_nanos(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    """The dearest cost of a call of up to ``input_tokens`` in and ``output_tokens`` out, rounded up."""
    flat = price.worst_within(input_tokens)
    total = input_tokens * flat.input_rate_max
    if output_tokens > 0:
        out_rate = flat.output_rate_max
        if out_rate is None:
            raise PriceUnknown("the model has no output price")
        total += output_tokens * out_rate
    return ceil_div(total, TOKENS_PER_PRICE)


def llm_worst_case(card: RateCard, body: Mapping[str, Any], *, provider: str | None = None) -> LlmEstimate:
    """Price an LLM request worst-case; ``price_unknown`` for an unknown model or no output bound."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise PriceUnknown("the request names no model")
    tier = body.get("service_tier")
    price = card.lookup(model, provider=provider, service_tier=tier if isinstance(tier, str) else None)
    if price is None:
        raise PriceUnknown(f"no price for model {model!r}: add it to [prices.models]")
    input_tokens = llm_input_bound(body)
    output_tokens = llm_output_bound(body, price)
    if output_tokens is None:
        raise PriceUnknown(
            f"the request to {model!r} has no max_tokens and [prices.models] gives the model no max_output"
        )
    amount = worst_case_nanos(price, input_tokens, output_tokens)
    if amount > MAX_NANOS:
        raise PriceUnknown(f"the worst case of this request to {model!r} is absurdly large")
    return LlmEstimate(model, input_tokens, output_tokens, amount, price.currency, price)


def llm_cost(price: ModelPrice, usage: TokenUsage) -> int:
    """The exact cost of reported usage, rounded up once.

    Uncached input at the input price, cache reads at ``cached_input``, cache writes at
    ``cache_write`` (one-hour writes at ``cache_write_1h``), output at the output price with the
    reasoning tokens — a subset of the output — at the reasoning price. Each part is billed once.
    ``price_unknown`` when output tokens were reported for a model without an output price.
    """
    input_tokens = max(usage.input_tokens, 0)
    flat = price.at(input_tokens)
    cached = max(usage.cached_input_tokens, 0)
    writes = max(usage.cache_write_tokens, 0)
    writes_1h = min(max(getattr(usage, "cache_write_1h_tokens", 0), 0), writes)
    uncached = max(input_tokens - cached - writes, 0)
    cached_rate = flat.cached_input if flat.cached_input is not None else flat.input
    write_rate = flat.cache_write if flat.cache_write is not None else flat.input
    write_1h_rate = flat.cache_write_1h if flat.cache_write_1h is not None else write_rate
    total = (
        uncached * flat.input
        + cached * cached_rate
        + (writes - writes_1h) * write_rate
        + writes_1h * write_1h_rate
    )
    output_tokens = max(usage.output_tokens, 0)
    reasoning = max(usage.reasoning_tokens, 0)
    if output_tokens or reasoning:
        if flat.output is None:
            raise PriceUnknown("output tokens were reported for a model without an output price")
        reasoning_rate = flat.reasoning if flat.reasoning is not None else flat.output
        total += max(output_tokens - reasoning, 0) * flat.output + reasoning * reasoning_rate
    return ceil_div(total, TOKENS_PER_PRICE)


def max_output_that_fits(price: ModelPrice, input_tokens: int, budget_nanos: int) -> int:
    """The largest output bound whose worst case (with ``input_tokens`` in) fits ``budget_nanos``.

    0 when nothing fits (not even the input, or the model has no output price); capped at the
    model's ``max_output`` when the card gives one; :data:`UNBOUNDED_OUTPUT` when output is free.
    """
    flat = price.worst_within(input_tokens)
    out_rate = flat.output_rate_max
    available = budget_nanos * TOKENS_PER_PRICE - input_tokens * flat.input_rate_max
    if available < 0 or out_rate is None:
        return 0
    fits = UNBOUNDED_OUTPUT if out_rate == 0 else available // out_rate
    if price.max_output is not None:
        fits = min(fits, price.max_output)
    return min(fits, UNBOUNDED_OUTPUT)
