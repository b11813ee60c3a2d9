"""From what the provider answered to what is charged: commit (how much, estimated or not)
or release.

How the actual cost is read is the connector's ``usage``:

- ``header:NAME`` — the cost the response header states, in the connector's currency;
- ``openai`` / ``anthropic`` — the token usage of the JSON body or the SSE stream, priced
  with the rate card (a connector-priced call only needs the usage to prove it happened);
- ``flat`` — the reserved price (for a tiered connector: the tier of the call's number as
  counted at commit). The default when the connector has ``pricing``; without pricing and
  without ``usage``, the usage is read as Anthropic's on a ``…/messages`` path and as
  OpenAI's elsewhere.

Outcomes (PROTOCOL.md, Gateway): a 3xx is released; a 4xx/5xx is charged from its usage
when it reports any, else released; a 2xx whose usage cannot be read, a stream cut before
its usage, a client gone before the upstream finished and a connection that failed after
the request was sent are charged at the hold, flagged ``estimated``. A call held at the
policies' ``on_price_unknown`` amount is charged that amount (``estimated``) unless its
usage can be priced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from paymaster.config import ConnectorConfig
from paymaster.pricer import Pricer, Quote
from paymaster.usage import SseUsageReader, Usage, read_cost_header, read_json, stream_reader

__all__ = ["Meter", "Settlement", "usage_kind"]

_TOKEN_KINDS: Final = frozenset({"openai", "anthropic"})


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to do with a hold. ``amount`` None with ``recount_tier``: the connector's tier
    price, read at commit from the tier count."""

    commit: bool
    reason: str
    amount: int | None = None
    estimated: bool = False
    quantity: str | None = None
    unit: str | None = None
    recount_tier: bool = False


def usage_kind(connector: ConnectorConfig, quote: Quote, path: str) -> str:
    """``flat``, ``header:NAME``, ``openai`` or ``anthropic`` for this call."""
    if connector.usage is not None:
        return connector.usage
    if quote.basis == "connector":
        return "flat"
    route = path.split("?", 1)[0].rstrip("/")
    return "anthropic" if route.endswith("/messages") else "openai"


class Meter:
    """Settles one call. ``hold`` is the reserved amount (the authority's currency)."""

    def __init__(
        self,
        pricer: Pricer,
        connector: ConnectorConfig,
        quote: Quote,
        kind: str,
        hold: int,
        clock: Callable[[], datetime],
    ) -> None:
        self.pricer = pricer
        self.connector = connector
        self.quote = quote
        self.kind = kind
        self.hold = hold
        self.clock = clock

    # -- outcomes without usage

    def release(self, reason: str) -> Settlement:
        return Settlement(commit=False, reason=reason)

    def at_hold(self, reason: str) -> Settlement:
        """The hold, flagged ``estimated``: the call happened, its cost is unknown."""
        return Settlement(
            commit=True,
            reason=reason,
            amount=self.hold,
            estimated=True,
            quantity=self.quote.quantity,
            unit=self.quote.unit,
        )

    # -- reading the cost

    def stream_reader(self, *, withhold_usage_chunk: bool) -> SseUsageReader | None:
        """The SSE usage reader of this call, when its cost comes from a token stream."""
        if self.kind not in _TOKEN_KINDS:
            return None
        return stream_reader(self.kind, withhold_usage_chunk=withhold_usage_chunk and self.kind == "openai")

    def from_body(self, status: int, headers: Mapping[str, str], body: bytes | None) -> Settlement:
        """A whole (non-stream) response; ``body`` None when it was too big to read."""
        if self.kind in _TOKEN_KINDS:
            usage = read_json(self.kind, body) if body is not None else None
            return self.from_usage(status, headers, usage, missing="usage_unreadable")
        return self.from_usage(status, headers, None, missing="usage_unreadable")

    def from_usage(
        self, status: int, headers: Mapping[str, str], usage: Usage | None, *, missing: str
    ) -> Settlement:
        """Settle from the token usage read (None: absent); ``missing`` names why it may be
        absent (``usage_unreadable``, ``stream_cut``, ``client_disconnected``)."""
        error = status >= 400
        if self.kind.startswith("header:"):
            return self._from_header(error, headers)
        if self.kind == "flat":
            return self.release("upstream_error") if error else self._flat()
        if usage is None:
            return self.release("upstream_error") if error else self.at_hold(missing)
        return self._from_tokens(usage)

    def _from_header(self, error: bool, headers: Mapping[str, str]) -> Settlement:
        currency = self.quote.pricing.currency if self.quote.pricing is not None else self.pricer.currency
        cost = read_cost_header(headers, self.kind.removeprefix("header:"), currency)
        if cost is None:
            return self.release("upstream_error") if error else self.at_hold("usage_unreadable")
        try:
            amount = self.pricer.to_budget(cost, currency, self.clock())
        except Exception:  # the rate vanished or went stale since the reserve: the hold stands
            return self.at_hold("usage_unconvertible")
        return Settlement(
            commit=True,
            reason="usage_header",
            amount=amount,
            quantity=self.quote.quantity,
            unit=self.quote.unit,
        )

    def _flat(self) -> Settlement:
        quote = self.quote
        if quote.basis == "connector":
            return Settlement(
                commit=True,
                reason="flat",
                amount=None if quote.tier_key else self.pricer.connector_charge(quote, None, self.clock()),
                quantity=quote.quantity,
                unit=quote.unit,
                recount_tier=quote.tier_key is not None,
            )
        if quote.basis == "fallback":
            return self.at_hold("price_unknown_hold")
        return Settlement(
            commit=True, reason="flat", amount=self.hold, quantity=quote.quantity, unit=quote.unit
        )

    def _from_tokens(self, usage: Usage) -> Settlement:
        quote = self.quote
        if quote.basis == "connector":
            return self._flat()
        now = self.clock()
        if quote.llm is not None:
            cost = self.pricer.llm_charge(quote.llm, usage, now)
        else:
            model = quote.request_json.get("model") if quote.request_json is not None else None
            cost = self.pricer.actual_cost(
                self.connector, usage, now=now, model=model if isinstance(model, str) else None
            )
        if cost is None:
            return self.at_hold("price_unknown_hold" if quote.basis == "fallback" else "usage_unpriced")
        return Settlement(
            commit=True,
            reason="usage",
            amount=cost,
            quantity=str(usage.input_tokens + usage.output_tokens),
            unit="tokens",
        )
