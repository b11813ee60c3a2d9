"""One governed request through the gateway, from ``/proxy/{host}/{path}`` to the provider
and back.

1. Parse the target from the raw path and find the connector of its host; a host reached
   without an explicit ``upstream`` must resolve to public addresses only. Read the body
   (at most :data:`MAX_BODY_BYTES`).
2. In one worker-thread hop: verify the spend token (step 1, ``aud`` = host, bound to
   ``htm``/``htu`` when present), refuse what could not be parsed (step 3, after the agent's
   status), and reserve: the authority runs steps 2 and 4–10, calling the pricer at step 7.
   Any failure of the authority itself is 503 ``authority_unavailable``: no upstream call.
3. Forward to the connector's ``upstream`` (or ``https://{host}``) with the agent's own
   credentials stripped and the connector's injected; redirects are never followed.
4. Settle: a whole response is read, charged from its usage and returned with the
   ``x-paymaster-*`` headers; a stream is relayed as it arrives and settled at its end
   (:mod:`paymaster.gateway.relay`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiohttp
import anyio
import anyio.to_thread
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from paymaster.authority import Authority, Caller, ReserveRequest
from paymaster.config import ConnectorConfig
from paymaster.core.budgets import check_id
from paymaster.errors import (
    AuthorityUnavailable,
    IdempotencyConflict,
    InvalidRequest,
    ReservationExpired,
    SpendDenied,
    SpendTokenInvalid,
    UpstreamFailed,
    UpstreamUnavailable,
)
from paymaster.gateway import headers as hdr
from paymaster.gateway.forward import (
    NotSent,
    SentFailed,
    Upstream,
    credential_of,
    downstream_headers,
    upstream_headers,
)
from paymaster.gateway.metering import Meter, Settlement, usage_kind
from paymaster.gateway.relay import Settle, StreamRelay
from paymaster.gateway.routing import AddressGuard, BadTarget, ConnectorIndex, Target, parse_target
from paymaster.money import parse_nanos
from paymaster.pricer import GatewayCall, Pricer, Quote, Quoter
from paymaster.server.auth import AGENT_HEADER, TOKEN_HEADER, refuse_after_token
from paymaster.server.errors import ERROR_CODE_KEY
from paymaster.store import ops
from paymaster.usage import ensure_openai_stream_usage

__all__ = ["MAX_BODY_BYTES", "Gateway"]

logger = logging.getLogger("paymaster.gateway")
T = TypeVar("T")

MAX_BODY_BYTES: Final = 10 * 1024 * 1024
MAX_BUFFERED_RESPONSE: Final = 16 * 1024 * 1024
THREAD_TOKENS: Final = 256
IDEMPOTENCY_HEADER: Final = "x-paymaster-idempotency-key"
SESSION_HEADER: Final = "x-paymaster-session"
TASK_HEADER: Final = "x-paymaster-task"
MAX_KEY: Final = 256


@dataclass(frozen=True, slots=True)
class Intent:
    """What the event loop learned about a request before the authority sees it."""

    method: str
    raw_host: str
    target: Target | None
    connector: ConnectorConfig | None
    host_refusal: str | None  # why the host is refused (policy_domain_blocked), if it is
    parse_error: SpendDenied | None  # a step-3 refusal, answered after the token's checks
    body: bytes
    headers: Headers


@dataclass(frozen=True, slots=True)
class Decided:
    answer: ops.Answer
    quoter: Quoter | None
    settler: Caller  # who settles the hold: the gateway, on behalf of the agent


class Gateway:
    """The gateway of one authority: its connectors, pricer, upstream pool and threads."""

    def __init__(self, authority: Authority, *, max_body: int = MAX_BODY_BYTES) -> None:
        self.authority = authority
        settings = authority.settings
        pricer = authority.pricer
        self.pricer: Pricer = pricer if isinstance(pricer, Pricer) else Pricer(settings)
        self.index = ConnectorIndex(settings.connectors)
        self.guard = AddressGuard()
        self.upstream = Upstream(self.index.private_upstreams)
        self.max_body = max_body
        self.timeout = float(max(settings.reservation_ttl - 1, 1))
        self._limiter: anyio.CapacityLimiter | None = None
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # made on first use: a limiter belongs to the event loop that runs the app
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(THREAD_TOKENS)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold a background task (a stream whose client left) until it is done."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self, grace: float = 10.0) -> None:
        """Let streams still settling finish (up to ``grace`` seconds), then close the pool."""
        pending = [t for t in self._background if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        await self.upstream.close()

    # ------------------------------------------------------------ the request

    async def handle(self, request: Request) -> Response:
        intent = await self._intent(request)
        try:
            decided = await self._run(self._decide, intent)
        except SpendDenied as denial:
            return _denial(request, denial.status, denial.to_body())
        except Exception as exc:
            logger.warning("gateway reserve failed, refusing the call: %r", exc)
            unavailable = AuthorityUnavailable("the authority cannot decide this call now; retry")
            return _denial(request, unavailable.status, unavailable.to_body())
        answer = decided.answer
        if not answer.ok:
            body = answer.body
            if intent.host_refusal is not None and body["error"].get("code") == "policy_domain_blocked":
                body = {"error": {**body["error"], "message": intent.host_refusal}}
            return _denial(request, answer.status, body)
        quoter = decided.quoter
        if quoter is None or quoter.quote is None or answer.body.get("gateway_request") != quoter.nonce:
            # the first answer of an idempotency key seen before: that call was already made
            replay = IdempotencyConflict(
                f"this idempotency key was already used for reservation {answer.body.get('reservation_id')};"
                " the call is not repeated: send a new key",
            )
            return _denial(request, replay.status, replay.to_body())
        assert intent.target is not None
        assert intent.connector is not None
        return await self._forward(request, intent, answer.body, quoter, quoter.quote, decided.settler)

    async def _intent(self, request: Request) -> Intent:
        scope = request.scope
        raw_path = bytes(scope.get("raw_path") or request.url.path.encode("utf-8")).split(b"?", 1)[0]
        parse_error: SpendDenied | None = None
        target: Target | None = None
        host_refusal: str | None = None
        raw_host = raw_path.removeprefix(b"/proxy/").split(b"/", 1)[0].decode("latin-1")
        try:
            target = parse_target(raw_path, scope.get("query_string", b""))
        except BadTarget as bad:
            if bad.kind == "host":
                host_refusal = f"host {raw_host!r} is refused: {bad.message}"
            else:
                parse_error = InvalidRequest(bad.message)
        connector: ConnectorConfig | None = None
        if target is not None:
            connector = self.index.lookup(target.host)
            if connector is not None and connector.upstream is None:
                host_refusal = await self.guard.refusal(target.hostname)
        body = b""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            parse_error = parse_error or _too_large(self.max_body)
        else:
            chunks: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    parse_error = parse_error or _too_large(self.max_body)
                    break
                chunks.append(chunk)
            body = b"".join(chunks)
        return Intent(
            method=request.method,
            raw_host=raw_host,
            target=target,
            connector=connector,
            host_refusal=host_refusal,
            parse_error=parse_error,
            body=body,
            headers=request.headers,
        )

    def _decide(self, intent: Intent) -> Decided:
        """Steps 1–10, on a worker thread: token, parse, then the authority's reserve."""
        headers = intent.headers
        target = intent.target
        # aud is the host; the port may be left out of it (the SDK signs the bare host name)
        audience: str | set[str] = (
            {intent.raw_host, target.host, target.hostname} if target is not None else intent.raw_host
        )
        caller = self.authority.verify_token(
            headers.get(TOKEN_HEADER),
            audience=audience,
            agent_header=headers.get(AGENT_HEADER),
            method=intent.method if target is not None else None,
            url=target.asked_url if target is not None else None,
        )
        claims = caller.claims
        try:
            if intent.parse_error is not None:
                raise intent.parse_error
            session = _agreed("session", headers.get(SESSION_HEADER), claims.session if claims else None)
            task = _agreed("task", headers.get(TASK_HEADER), claims.task if claims else None)
            key = headers.get(IDEMPOTENCY_HEADER)
            if key is not None and not 0 < len(key) <= MAX_KEY:
                raise InvalidRequest(f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY} characters")
        except SpendDenied as denial:
            refuse_after_token(self.authority, caller, denial)
        assert target is not None or intent.host_refusal is not None
        host = target.host if target is not None else intent.raw_host
        connector = intent.connector if intent.host_refusal is None else None
        digest = _input_hash(intent.method, target.url if target is not None else host, intent.body)
        quoter: Quoter | None = None
        if connector is not None and target is not None:
            call = GatewayCall(connector, intent.method, target.path, intent.body)
            quoter = self.pricer.quoter(call, nonce=uuid.uuid4().hex)
        request = ReserveRequest(
            # a host no connector may serve gets a connector id none has, so that the
            # authority refuses it at step 4 (policy_domain_blocked) and records the denial
            connector=connector.id if connector is not None else self._unserved(host),
            idempotency_key=key or uuid.uuid4().hex,
            agent_id=caller.agent_id,
            session=session,
            task=task,
            input_hash=digest,
            body_hash=digest,
            request_sent=True,
            host=host,
            price=quoter,
        )
        # the gateway settles as the authority itself; naming the agent spares the commit a
        # store read (its velocity check would otherwise look the agent up)
        settler = Caller("admin", agent_id=caller.agent_id)
        return Decided(self.authority.reserve_answer(request, caller), quoter, settler)

    def _unserved(self, host: str) -> str:
        candidate = f"(unserved:{host})"
        while self.authority.settings.connector(candidate) is not None:
            candidate += "_"
        return candidate

    # ------------------------------------------------------------ forwarding

    async def _forward(
        self,
        request: Request,
        intent: Intent,
        answer: Mapping[str, Any],
        quoter: Quoter,
        quote: Quote,
        settler: Caller,
    ) -> Response:
        target, connector = intent.target, intent.connector
        assert target is not None
        assert connector is not None
        reservation_id = str(answer["reservation_id"])
        hold = parse_nanos(str(answer["amount"]))
        kind = usage_kind(connector, quote, target.path)
        meter = Meter(self.pricer, connector, quote, kind, hold, self.authority.clock)
        body = quote.send_body if quote.send_body is not None else intent.body
        withhold = False
        if kind == "openai":
            document = quote.request_json if quote.request_json is not None else quoter.request_json()
            if document is not None and document.get("stream") is True:
                try:
                    patched, asked = ensure_openai_stream_usage(dict(document), path=target.path)
                except SpendDenied:
                    patched, asked = dict(document), True
                if not asked:
                    body = json.dumps(patched, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
                    withhold = True
        credential = credential_of(connector)
        secret = credential[1] if credential is not None else None
        out_headers = upstream_headers(request.scope["headers"], credential)
        url = self.index.upstream_url(connector, target)
        settle = self._settler(reservation_id, quote, settler)
        try:
            upstream = await self.upstream.send(intent.method, url, out_headers, body, timeout=self.timeout)
        except NotSent as exc:
            logger.info("upstream unavailable for %s: %s", reservation_id, exc)
            await self._settle_quietly(settle, meter.release("upstream_unavailable"))
            failure: SpendDenied = UpstreamUnavailable(
                f"the provider at {target.host} could not be reached; nothing was charged"
            )
            return _denial(request, failure.status, failure.to_body(), hdr.reserve_headers(answer))
        except SentFailed as exc:
            return await self._failed_after_send(request, answer, meter, settle, target, exc)
        passed = downstream_headers(upstream.headers.items(), secret)
        ours = hdr.reserve_headers(answer)
        content_type = upstream.headers.get("content-type", "")
        redirect = 300 <= upstream.status < 400
        if content_type.lower().startswith("text/event-stream") and not redirect:
            reader = meter.stream_reader(withhold_usage_chunk=withhold)
            return StreamRelay(
                upstream,
                headers=passed + ours,
                reader=reader,
                meter=meter,
                answer=answer,
                settle=settle,
                keep=self.keep,
            )
        try:
            whole, rest = await _read_bounded(upstream, MAX_BUFFERED_RESPONSE)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            upstream.release()
            return await self._failed_after_send(request, answer, meter, settle, target, SentFailed(str(exc)))
        if redirect:
            settlement = meter.release("redirect")
        else:
            try:
                settlement = meter.from_body(
                    upstream.status, upstream.headers, whole if rest is None else None
                )
            except Exception:  # a bug in metering must not leave the hold to chance
                logger.exception("metering %s failed; charging the hold", reservation_id)
                settlement = meter.at_hold("metering_failed")
        charged = await self._settle_quietly(settle, settlement)
        if charged is not None:
            ours += hdr.settled_headers(answer, hold, charged, estimated=settlement.estimated)
        if rest is None:
            upstream.release()
            response = Response(whole, status_code=upstream.status)
            response.raw_headers.extend(passed + ours)
            return response
        streamed = StreamingResponse(_chain(whole, rest, upstream), status_code=upstream.status)
        streamed.raw_headers = [h for h in streamed.raw_headers if h[0] != b"content-type"] + passed + ours
        return streamed

    async def _failed_after_send(
        self,
        request: Request,
        answer: Mapping[str, Any],
        meter: Meter,
        settle: Settle,
        target: Target,
        exc: Exception,
    ) -> Response:
        logger.info("upstream failed after the request was sent (%s): %s", answer["reservation_id"], exc)
        settlement = meter.at_hold("upstream_failed")
        charged = await self._settle_quietly(settle, settlement)
        failure = UpstreamFailed(
            f"the connection to {target.host} failed after the request was sent;"
            " charged at the hold, estimated"
        )
        extra = hdr.reserve_headers(answer)
        if charged is not None:
            extra += hdr.settled_headers(answer, meter.hold, charged, estimated=True)
        return _denial(request, failure.status, failure.to_body(), extra)

    # ------------------------------------------------------------ settling

    def _settler(self, reservation_id: str, quote: Quote, caller: Caller) -> Settle:
        async def settle(settlement: Settlement) -> int | None:
            return await self._run(self._settle_sync, reservation_id, quote, settlement, caller)

        return settle

    async def _settle_quietly(self, settle: Settle, settlement: Settlement) -> int | None:
        try:
            charged: int | None = await settle(settlement)
        except Exception:
            logger.exception("settling failed; the hold is charged at expiry (estimated)")
            return None
        return charged

    def _settle_sync(
        self, reservation_id: str, quote: Quote, settlement: Settlement, caller: Caller
    ) -> int | None:
        """Commit or release on a worker thread; the amount charged (0 when released), or
        None when the settlement could not be recorded (the hold expires charged)."""
        authority = self.authority
        try:
            if not settlement.commit:
                authority.release(reservation_id, caller=caller, reason=settlement.reason)
                return 0
            amount = settlement.amount
            if settlement.recount_tier and quote.tier_key is not None:
                key = quote.tier_key
                row = authority.store.read(
                    lambda tx: tx.one("SELECT calls FROM tier_counters WHERE tier_key = ?", (key,))
                )
                amount = self.pricer.connector_charge(
                    quote, int(row["calls"]) if row else None, authority.clock()
                )
            result = authority.commit(
                reservation_id,
                amount=amount,
                caller=caller,
                estimated=settlement.estimated,
                quantity=settlement.quantity,
                unit=settlement.unit,
                reason=settlement.reason,
            )
            return parse_nanos(str(result["charged"]))
        except ReservationExpired:
            # the hold outlived its TTL and was settled by expiry (charged at the hold)
            charged = authority.query_reservation(reservation_id).get("charged")
            return parse_nanos(charged) if isinstance(charged, str) else None
        except Exception:
            logger.exception("could not settle %s; it is settled when it expires", reservation_id)
            return None


# ---------------------------------------------------------------- helpers


def _denial(
    request: Request, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    error = body.get("error")
    if isinstance(error, dict):
        request.scope[ERROR_CODE_KEY] = error.get("code")
    response = JSONResponse(body, status_code=status)
    if headers:
        response.raw_headers.extend(headers)
    return response


def _too_large(limit: int) -> InvalidRequest:
    return InvalidRequest(f"the request body is larger than {limit} bytes", status=413)


def _agreed(name: str, in_header: str | None, in_token: str | None) -> str | None:
    """A session or task named by header and token: both must agree; the token's applies
    when the request names none."""
    if in_header is not None and in_token is not None and in_header != in_token:
        raise SpendTokenInvalid(f"the spend token is bound to another {name}")
    value = in_header if in_header is not None else in_token
    return None if value is None else check_id(value, name)


def _input_hash(method: str, url: str, body: bytes) -> str:
    """What the loop guard counts: the same method, full URL (query included) and body."""
    digest = hashlib.sha256()
    digest.update(method.upper().encode("ascii", "replace"))
    digest.update(b"\n")
    digest.update(url.encode("utf-8", "replace"))
    digest.update(b"\n")
    digest.update(body)
    return digest.hexdigest()


async def _read_bounded(upstream: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool | None]:
    """The whole body when it is at most ``limit`` bytes (``(body, None)``); else the first
    part read and True: the rest is still to be read from ``upstream``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in upstream.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), True
    return b"".join(chunks), None


async def _chain(first: bytes, more: bool | None, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        yield first
        if more:
            async for chunk in upstream.content.iter_any():
                yield chunk
    finally:
        upstream.release()
