"""Webhook alerts: once per threshold per window across replicas, signed, retried with
backoff, surviving a restart — against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from paymaster import alerts
from paymaster.alerts import WebhookDeliverer, verify_webhook
from paymaster.authority import Authority, Caller, ReserveRequest
from paymaster.bootstrap import open_authority
from paymaster.config import Settings
from paymaster.core import tokens
from paymaster.errors import InvalidRequest, SpendDenied
from paymaster.money import parse_nanos
from paymaster.store import ops

T0 = datetime(2026, 11, 24, 2, 47, tzinfo=UTC)
THRESHOLD = "dev.paymaster.budget.threshold_crossed"


# ---------------------------------------------------------------- helpers


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self.now += timedelta(seconds=seconds)
            return self.now


class Receiver:
    """A webhook endpoint on loopback: records every request; the first ``fail_first``
    answer ``fail_status``."""

    def __init__(
        self,
        *,
        fail_first: int = 0,
        fail_status: int = 500,
        delay: float = 0.0,
        retry_after: str | None = None,
    ) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay = delay
        self.retry_after = retry_after
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    failing = len(receiver.requests) <= receiver.fail_first
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.fail_status if failing else 200
                self.send_response(status)
                if failing and receiver.retry_after is not None:
                    self.send_header("retry-after", receiver.retry_after)
                payload = b"boom" if failing else b"ok"
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hooks/paymaster"

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def opened() -> Iterator[list[Authority]]:
    """Authorities to close at the end of the test."""
    out: list[Authority] = []
    yield out
    for authority in out:
        authority.store.close()


def open_on(path: Path, alerts_config: dict[str, Any], clock: Clock, opened: list[Authority]) -> Authority:
    settings = Settings(db_url=f"sqlite:///{path / 'pm.db'}", home=str(path), alerts=alerts_config)
    authority = open_authority(settings, clock=clock)
    opened.append(authority)
    return authority


def make_agent(authority: Authority, *, wallet: str, policy: dict[str, Any] | None = None) -> str:
    key = tokens.generate_private_key()
    agent = authority.create_agent("bot", tokens.public_key_b64(key), policy=policy)
    authority.fund(agent["id"], parse_nanos(wallet))
    return str(agent["id"])


def spend(authority: Authority, agent_id: str, amount: str) -> dict[str, Any]:
    """Reserve and commit ``amount``: the reserve's answer (its warnings)."""
    res = authority.reserve(
        ReserveRequest(connector="tool", idempotency_key=None, agent_id=agent_id, amount=parse_nanos(amount)),
        Caller.admin(),
    )
    authority.commit(res["reservation_id"], amount=None, caller=Caller.admin())
    return res


def outbox(authority: Authority) -> list[dict[str, Any]]:
    rows = authority.store.read(lambda tx: tx.all("SELECT * FROM outbox ORDER BY id"))
    return [dict(r) for r in rows]


def crossings(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["data"]["budget_id"], e["data"]["threshold"]) for e in events if e["type"] == THRESHOLD]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def deliverer(authority: Authority, **options: Any) -> WebhookDeliverer:
    made = WebhookDeliverer.from_settings(authority, **options)
    assert made is not None
    return made


# ---------------------------------------------------------------- once per threshold per window


def test_two_replicas_deliver_each_threshold_exactly_once(
    tmp_path: Path, clock: Clock, opened: list[Authority]
) -> None:
    slow = Receiver(delay=0.02)  # slow enough that the two deliverers overlap
    try:
        config = {"webhook": slow.url}
        a = open_on(tmp_path, config, clock, opened)
        b = open_on(tmp_path, config, clock, opened)  # a second replica on the same database
        agent = make_agent(a, wallet="10.00", policy={"daily_cap": "9.00"})
        senders = [deliverer(x, poll_interval=0.005) for x in (a, b)]
        for d in senders:
            d.start()

        def one(i: int) -> bool:
            try:
                spend((a, b)[i % 2], agent, "0.40")
            except SpendDenied:
                return False
            return True

        with ThreadPoolExecutor(max_workers=8) as pool:
            allowed = sum(pool.map(one, range(30)))
        assert allowed == 22  # 22 x 0.40 = 8.80 fits the 9.00 day cap, the 23rd does not

        wait_for(lambda: all(r["delivered_at"] for r in outbox(a)) and len(slow.requests) >= 5)
        time.sleep(0.1)  # a duplicate would arrive now
        for d in senders:
            d.stop()

        day = f"{agent}/day/2026-11-24"
        expected = {
            (f"{agent}/total", "0.5"),  # 8.80 / 10.00 = 0.88
            (f"{agent}/total", "0.75"),
            (day, "0.5"),  # 8.80 / 9.00 = 0.98
            (day, "0.75"),
            (day, "0.9"),
        }
        delivered = crossings(slow.events())
        assert sorted(delivered) == sorted(expected)  # each once: no spam, no duplicate
        ids = [h["ce-id"] for h, _ in slow.requests]
        assert len(ids) == len(set(ids)) == 5
        assert sorted(crossings(a.events())) == sorted(expected)  # once in the audit chain too
        rows = outbox(b)
        assert len(rows) == 5
        assert all(r["attempts"] == 1 and r["last_error"] is None for r in rows)
    finally:
        slow.close()


def test_concurrent_deliverers_never_send_a_row_twice(
    tmp_path: Path, clock: Clock, opened: list[Authority]
) -> None:
    slow = Receiver(delay=0.01)
    try:
        config = {"webhook": slow.url, "events": ["agent.frozen"]}
        a = open_on(tmp_path, config, clock, opened)
        b = open_on(tmp_path, config, clock, opened)
        for _ in range(40):
            a.set_status(make_agent(a, wallet="1.00"), "frozen")  # 40 rows waiting
        senders = [deliverer(x, batch_size=5) for x in (a, b)]
        counts = [0, 0]
        start = threading.Barrier(2)

        def drain(i: int) -> None:
            start.wait()
            while True:
                claimed, delivered = senders[i]._pass(clock())
                counts[i] += delivered
                if claimed == 0:
                    return

        threads = [threading.Thread(target=drain, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for d in senders:
            d.close()
        ids = [h["ce-id"] for h, _ in slow.requests]
        assert len(ids) == len(set(ids)) == 40
        assert sum(counts) == 40 and min(counts) > 0  # both worked, neither sent a row twice
        assert all(r["attempts"] == 1 and r["delivered_at"] for r in outbox(a))
    finally:
        slow.close()


def test_thresholds_fire_once_each_not_on_every_request(
    tmp_path: Path, clock: Clock, receiver: Receiver, opened: list[Authority]
) -> None:
    authority = open_on(tmp_path, {"webhook": receiver.url}, clock, opened)
    agent = make_agent(authority, wallet="100.00")
    warned = 0
    for _ in range(95):
        warned += bool(spend(authority, agent, "1.00")["warnings"])
    assert warned == 46  # the low-balance warning is on every answer past 0.5 ...
    rows = outbox(authority)
    assert len(rows) == 3  # ... but the alert fires once per threshold
    assert deliverer(authority).deliver_due() == 3
    assert [e["data"]["threshold"] for e in receiver.events()] == ["0.5", "0.75", "0.9"]
    assert [e["data"]["used"] for e in receiver.events()] == ["0.50", "0.75", "0.90"]
    for _ in range(4):
        spend(authority, agent, "1.00")
    assert len(outbox(authority)) == 3
    assert deliverer(authority).deliver_due() == 0
    assert len(receiver.requests) == 3


def test_a_new_window_alerts_again(
    tmp_path: Path, clock: Clock, receiver: Receiver, opened: list[Authority]
) -> None:
    authority = open_on(tmp_path, {"webhook": receiver.url}, clock, opened)
    agent = make_agent(
        authority, wallet="1000.00", policy={"daily_cap": "10.00", "alert_thresholds": ["0.5"]}
    )
    for _ in range(8):
        spend(authority, agent, "1.00")
    clock.advance(24 * 3600)  # the next day: a new cap window
    for _ in range(8):
        spend(authority, agent, "1.00")
    assert deliverer(authority).deliver_due() == 2
    assert crossings(receiver.events()) == [
        (f"{agent}/day/2026-11-24", "0.5"),
        (f"{agent}/day/2026-11-25", "0.5"),
    ]


# ---------------------------------------------------------------- body and signature


def test_body_headers_and_signature(
    tmp_path: Path, clock: Clock, receiver: Receiver, opened: list[Authority]
) -> None:
    authority = open_on(tmp_path, {"webhook": receiver.url}, clock, opened)
    agent = make_agent(authority, wallet="2.00", policy={"alert_thresholds": ["0.5"]})
    spend(authority, agent, "1.00")
    assert deliverer(authority).deliver_due() == 1
    ((headers, body),) = receiver.requests
    event = json.loads(body)
    stored = outbox(authority)[0]
    assert body == stored["body"].encode()  # the exact bytes that were stored and signed
    assert event["type"] == THRESHOLD and event["specversion"] == "1.0"
    assert event["data"]["budget_id"] == f"{agent}/total"
    assert event["id"] == stored["event_id"] == headers["ce-id"]
    assert headers["ce-type"] == THRESHOLD
    assert headers["content-type"] == "application/cloudevents+json"
    assert event in authority.events()  # the very event of the audit chain
    signature = headers["x-paymaster-signature"]
    assert signature.startswith("ed25519=")

    public = authority.public_key
    assert verify_webhook(body, signature, public)
    assert verify_webhook(body, signature, tokens.public_key_b64(public))
    from paymaster.server.routes import jwks  # what GET /v1/authority/keys answers

    keys = jwks(authority)
    assert verify_webhook(body, signature, keys)
    assert headers["x-paymaster-key-id"] == keys["keys"][0]["kid"] == alerts.key_id(public)

    tampered = body.replace(b'"threshold":"0.5"', b'"threshold":"0.9"')
    assert tampered != body
    assert not verify_webhook(tampered, signature, public)
    assert not verify_webhook(body + b" ", signature, public)
    other = tokens.generate_private_key().public_key()
    assert not verify_webhook(body, signature, other)
    assert verify_webhook(body, signature, [other, public])  # key rotation: any listed key
    assert verify_webhook(body, f"ed25519=AAAA, {signature}", public)
    for bad in (None, "", "ed25519=", "ed25519=!!!", "sha256=" + signature[8:], signature[8:]):
        assert not verify_webhook(body, bad, public)
    assert not verify_webhook(body, signature, "not-a-key")


# ---------------------------------------------------------------- retries


def test_retries_with_backoff_after_500s(tmp_path: Path, clock: Clock, opened: list[Authority]) -> None:
    failing = Receiver(fail_first=2)
    try:
        authority = open_on(tmp_path, {"webhook": failing.url}, clock, opened)
        agent = make_agent(authority, wallet="2.00", policy={"alert_thresholds": ["0.5"]})
        spend(authority, agent, "1.00")
        sender = deliverer(authority, base_delay=2.0, max_delay=5.0, rng=lambda: 1.0)
        t0 = clock()

        assert sender.deliver_due(t0) == 0  # 500
        row = outbox(authority)[0]
        assert row["attempts"] == 1 and row["delivered_at"] is None
        assert row["last_error"].startswith("HTTP 500")
        assert row["next_attempt_at"] == "2026-11-24T02:47:02.000000Z"  # t0 + 2 s

        assert sender.deliver_due(t0 + timedelta(seconds=1)) == 0  # not due: nothing sent
        assert len(failing.requests) == 1
        assert sender.deliver_due(t0 + timedelta(seconds=2)) == 0  # 500 again
        assert outbox(authority)[0]["next_attempt_at"] == "2026-11-24T02:47:06.000000Z"  # + 4 s
        assert sender.deliver_due(t0 + timedelta(seconds=5)) == 0
        assert len(failing.requests) == 2
        assert sender.deliver_due(t0 + timedelta(seconds=6)) == 1
        row = outbox(authority)[0]
        assert row["delivered_at"] == "2026-11-24T02:47:06.000000Z"
        assert row["attempts"] == 3 and row["last_error"] is None
        assert len({h["ce-id"] for h, _ in failing.requests}) == 1  # the same event, retried
        assert all(
            verify_webhook(body, h["x-paymaster-signature"], authority.public_key)
            for h, body in failing.requests
        )
        assert sender.deliver_due(t0 + timedelta(hours=1)) == 0
        assert len(failing.requests) == 3
    finally:
        failing.close()


def test_backoff_is_exponential_jittered_and_capped(
    tmp_path: Path, clock: Clock, opened: list[Authority]
) -> None:
    authority = open_on(tmp_path, {"webhook": "http://127.0.0.1:9/"}, clock, opened)
    high = WebhookDeliverer(authority, url="http://127.0.0.1:9/", events=None, rng=lambda: 1.0)
    low = WebhookDeliverer(authority, url="http://127.0.0.1:9/", events=None, rng=lambda: 0.0)
    try:
        assert [high.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
        assert [low.backoff(n) for n in range(1, 4)] == [0.5, 1.0, 2.0]
        assert high.backoff(11) == 600.0 and high.backoff(500) == 600.0
        assert low.backoff(500) == 300.0
    finally:
        high.close()
        low.close()


def test_retry_after_is_honoured(tmp_path: Path, clock: Clock, opened: list[Authority]) -> None:
    busy = Receiver(fail_first=1, fail_status=503, retry_after="30")
    try:
        authority = open_on(tmp_path, {"webhook": busy.url}, clock, opened)
        agent = make_agent(authority, wallet="2.00", policy={"alert_thresholds": ["0.5"]})
        spend(authority, agent, "1.00")
        sender = deliverer(authority, rng=lambda: 1.0)
        assert sender.deliver_due() == 0
        assert outbox(authority)[0]["next_attempt_at"] == "2026-11-24T02:47:30.000000Z"
        assert sender.deliver_due(clock.advance(29)) == 0 and len(busy.requests) == 1
        assert sender.deliver_due(clock.advance(1)) == 1
    finally:
        busy.close()


def test_gives_up_after_max_attempts_and_keeps_the_row(
    tmp_path: Path, clock: Clock, opened: list[Authority]
) -> None:
    down = Receiver(fail_first=10**6)
    try:
        authority = open_on(tmp_path, {"webhook": down.url}, clock, opened)
        agent = make_agent(authority, wallet="2.00", policy={"alert_thresholds": ["0.5"]})
        spend(authority, agent, "1.00")
        sender = deliverer(authority, max_attempts=3, base_delay=1.0, max_delay=1.0)
        for _ in range(10):
            sender.deliver_due(clock.advance(5))
        assert len(down.requests) == 3
        row = outbox(authority)[0]
        assert row["delivered_at"] is None and row["attempts"] == 3
        assert row["last_error"].startswith("gave up after 3 attempts: HTTP 500")
        assert [p["event_id"] for p in sender.pending()] == [row["event_id"]]
    finally:
        down.close()


def test_unreachable_receiver_is_retried(tmp_path: Path, clock: Clock, opened: list[Authority]) -> None:
    closed = Receiver()
    url = closed.url
    closed.close()  # nobody listens on that port any more
    authority = open_on(tmp_path, {"webhook": url}, clock, opened)
    agent = make_agent(authority, wallet="2.00", policy={"alert_thresholds": ["0.5"]})
    spend(authority, agent, "1.00")
    sender = deliverer(authority, timeout=2.0)
    try:
        assert sender.deliver_due() == 0
        row = outbox(authority)[0]
        assert row["attempts"] == 1 and row["delivered_at"] is None
        assert "ConnectError" in row["last_error"]
    finally:
        sender.close()


# ---------------------------------------------------------------- restarts


def test_pending_delivery_survives_a_restart(tmp_path: Path, clock: Clock, opened: list[Authority]) -> None:
    flaky = Receiver(fail_first=1)
    try:
        config = {"webhook": flaky.url}
        first = open_on(tmp_path, config, clock, opened)
        agent = make_agent(first, wallet="2.00", policy={"alert_thresholds": ["0.5"]})
        spend(first, agent, "1.00")
        assert deliverer(first).deliver_due() == 0  # 500: pending, to retry
        first.store.close()
        opened.remove(first)

        second = open_on(tmp_path, config, clock, opened)  # the restarted process
        assert deliverer(second).deliver_due(clock.advance(600)) == 1
        assert len(flaky.requests) == 2  # the failed attempt, then the one after the restart
        assert crossings(flaky.events()) == [(f"{agent}/total", "0.5")] * 2
        assert len({h["ce-id"] for h, _ in flaky.requests}) == 1
        assert outbox(second)[0]["delivered_at"] is not None
    finally:
        flaky.close()


def test_a_claim_lost_in_a_crash_is_sent_when_its_lease_ends(
    tmp_path: Path, clock: Clock, receiver: Receiver, opened: list[Authority]
) -> None:
    config = {"webhook": receiver.url}
    first = open_on(tmp_path, config, clock, opened)
    agent = make_agent(first, wallet="2.00", policy={"alert_thresholds": ["0.5"]})
    spend(first, agent, "1.00")
    crashed = deliverer(first, lease_seconds=60)
    claims = first.store.write(lambda tx: crashed._claim(tx, clock())).result()
    assert len(claims) == 1  # claimed, then the process died before sending
    crashed.close()
    first.store.close()
    opened.remove(first)

    second = open_on(tmp_path, config, clock, opened)
    sender = deliverer(second, lease_seconds=60)
    assert sender.deliver_due(clock.advance(30)) == 0  # still leased to the dead process
    assert receiver.requests == []
    assert sender.deliver_due(clock.advance(30)) == 1
    assert crossings(receiver.events()) == [(f"{agent}/total", "0.5")]
    assert outbox(second)[0]["attempts"] == 2  # the lost attempt counts


# ---------------------------------------------------------------- configuration


def test_other_event_types_named_in_alerts_events(
    tmp_path: Path, clock: Clock, receiver: Receiver, opened: list[Authority]
) -> None:
    config = {"webhook": receiver.url, "events": ["agent.frozen", "dev.paymaster.policy.changed"]}
    authority = open_on(tmp_path, config, clock, opened)
    agent = make_agent(authority, wallet="100.00")  # no policy: no policy.changed yet
    spend(authority, agent, "1.00")  # allowed + committed: not alerted
    authority.set_status(agent, "frozen")
    authority.set_agent_policy(agent, {"daily_cap": "5.00"})
    types = [json.loads(r["body"])["type"] for r in outbox(authority)]
    assert types == ["dev.paymaster.agent.frozen", "dev.paymaster.policy.changed"]
    assert deliverer(authority).deliver_due() == 2
    assert [e["type"] for e in receiver.events()] == types


def test_no_webhook_no_outbox(tmp_path: Path, clock: Clock, opened: list[Authority]) -> None:
    authority = open_on(tmp_path, {}, clock, opened)
    agent = make_agent(authority, wallet="2.00")
    for _ in range(2):
        spend(authority, agent, "1.00")
    assert crossings(authority.events())  # still recorded in the audit chain
    assert outbox(authority) == []
    assert WebhookDeliverer.from_settings(authority) is None
    assert alerts.start_deliverer(authority) is None


def test_unknown_event_type_is_refused(tmp_path: Path, clock: Clock, opened: list[Authority]) -> None:
    with pytest.raises(InvalidRequest, match="unknown event types"):
        open_on(tmp_path, {"webhook": "http://127.0.0.1:9/", "events": ["agent.exploded"]}, clock, opened)
    assert ops.outbox_types({"events": ["agent.frozen"]}) == frozenset()  # no webhook: nothing


def test_rows_of_types_no_longer_alerted_are_given_up(
    tmp_path: Path, clock: Clock, receiver: Receiver, opened: list[Authority]
) -> None:
    config = {"webhook": receiver.url, "events": ["agent.frozen"]}
    authority = open_on(tmp_path, config, clock, opened)
    agent = make_agent(authority, wallet="2.00")
    authority.set_status(agent, "frozen")
    narrower = WebhookDeliverer(authority, url=receiver.url, events={THRESHOLD})  # config changed since
    try:
        assert narrower.deliver_due() == 0
        assert receiver.requests == []
        row = outbox(authority)[0]
        assert row["delivered_at"] is None and row["last_error"].startswith(
            "not sent: dev.paymaster.agent.frozen"
        )
        assert narrower.deliver_due(clock.advance(3600)) == 0  # never retried
    finally:
        narrower.close()


def test_start_deliverer_runs_a_background_thread(
    tmp_path: Path, clock: Clock, receiver: Receiver, opened: list[Authority]
) -> None:
    authority = open_on(tmp_path, {"webhook": receiver.url}, clock, opened)
    running = alerts.start_deliverer(authority)
    assert running is not None
    try:
        agent = make_agent(authority, wallet="2.00", policy={"alert_thresholds": ["0.5"]})
        spend(authority, agent, "1.00")
        wait_for(lambda: len(receiver.requests) == 1)
    finally:
        running.stop()
    assert all(r["delivered_at"] for r in outbox(authority))
