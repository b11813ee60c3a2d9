"""The dashboard (``paymaster.server.ui``): login, sessions, pages, the FOCUS report.

Each test runs against the routes mounted in a bare ``Starlette`` app and, where the server's
app factory exists, through ``create_app`` too (the dashboard's routes added when the factory
does not mount them yet), over Starlette's ``TestClient``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from paymaster.authority import Authority, Caller, ReserveRequest
from paymaster.bootstrap import create_service_key, open_authority
from paymaster.config import load_settings
from paymaster.core import tokens
from paymaster.money import parse_nanos
from paymaster.reports import focus
from paymaster.server.ui import charts, routes
from paymaster.server.ui.session import SESSION_TTL_SECONDS, Sessions

ADMIN_KEY = "pm_admin_dashboard-test-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
START = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
EVIL = "<script>alert(1)</script>"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class World:
    authority: Authority
    clock: Clock
    path: Path
    evil: str  # the id of the agent named <script>…
    writer: str
    charge_id: str


def _agent(authority: Authority, name: str, **kwargs: Any) -> str:
    public_key = tokens.public_key_b64(tokens.generate_private_key())
    agent_id: str = authority.create_agent(name, public_key, **kwargs)["id"]
    return agent_id


def _spend(authority: Authority, agent_id: str, hold: str, charge: str, connector: str) -> dict[str, Any]:
    req = ReserveRequest(
        connector=connector, idempotency_key=None, agent_id=agent_id, amount=parse_nanos(hold)
    )
    res = authority.reserve(req, Caller("agent", agent_id=agent_id))
    return authority.commit(res["reservation_id"], amount=parse_nanos(charge), caller=Caller.admin())


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = Clock()
    db = tmp_path / "pm.db"
    config = tmp_path / "paymaster.toml"
    config.write_text('authority_id = "pm.test"\n')
    settings = load_settings(
        db=f"sqlite:///{db}", config=str(config), env={"PAYMASTER_ADMIN_KEY": ADMIN_KEY}, home=str(tmp_path)
    )
    authority = open_authority(settings, clock=clock)
    evil = _agent(
        authority,
        EVIL,
        policy={"daily_cap": "2.00"},
        parent="team:growth",
        metadata={"team": "<b>growth</b>"},
    )
    authority.fund(evil, parse_nanos("20.00"))
    charge = _spend(authority, evil, "2.00", "1.50", "openai")
    authority.refund(charge["ledger_entry_id"], parse_nanos("0.50"), "duplicate call", None)
    _spend(authority, evil, "0.80", "0.80", "search")  # day cap: 1.80 of 2.00 used, 90 %
    writer = _agent(authority, "writer")
    authority.fund(writer, parse_nanos("5.00"))
    clock.advance(60)
    yield World(authority, clock, db, evil, writer, charge["ledger_entry_id"])
    authority.store.close()


def _bare(authority: Authority) -> Starlette:
    return Starlette(routes=routes(authority))


def _through_factory(authority: Authority) -> Starlette:
    from paymaster.server.app import create_app

    app = create_app(authority)
    if not any(isinstance(r, Route) and r.path == "/" for r in app.router.routes):
        app.router.routes.extend(routes(authority))
    return app


def _factory_available() -> bool:
    try:
        import paymaster.server.app  # noqa: F401
    except ImportError:
        return False
    return True


APPS = [
    pytest.param(_bare, id="bare"),
    pytest.param(
        _through_factory,
        id="create_app",
        marks=pytest.mark.skipif(not _factory_available(), reason="no server app factory yet"),
    ),
]


@pytest.fixture(params=APPS)
def app(request: pytest.FixtureRequest, world: World) -> Starlette:
    make: Callable[[Authority], Starlette] = request.param
    return make(world.authority)


@pytest.fixture
def client(app: Starlette) -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as c:
        yield c


def new_client(app: Starlette) -> TestClient:
    return TestClient(app, follow_redirects=False)


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match is not None, "no CSRF field on the page"
    return match.group(1)


def login(client: TestClient, key: str = ADMIN_KEY, **extra: str) -> Any:
    page = client.get("/")
    return client.post("/login", data={"admin_key": key, "csrf": csrf_of(page.text), **extra})


def set_cookies(response: Any) -> list[str]:
    return [v for k, v in response.headers.multi_items() if k.lower() == "set-cookie"]


def session_cookie(response: Any) -> str | None:
    for header in set_cookies(response):
        name, _, rest = header.partition("=")
        if name == "pm_session":
            return rest.partition(";")[0]
    return None


def assert_security_headers(response: Any) -> None:
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"


# ---------------------------------------------------------------- login and sessions


def test_root_without_a_key_answers_the_login_form(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert '<form method="post" action="/login">' in r.text
    assert 'name="admin_key"' in r.text and 'type="password"' in r.text
    assert "writer" not in r.text and "20.00" not in r.text and "pm.test" not in r.text
    assert_security_headers(r)
    assert r.headers["cache-control"] == "no-store"
    assert any(h.startswith("pm_csrf=") for h in set_cookies(r))


def test_bearer_admin_key_shows_agents_and_budgets(client: TestClient, world: World) -> None:
    r = client.get("/", headers=ADMIN)
    assert r.status_code == 200
    text = r.text
    assert "writer" in text and world.evil in text and world.writer in text
    assert "Wallet" in text and "all · day" in text
    for figure in ("20.00", "1.80", "18.20", "5.00"):
        assert figure in text
    assert "lvl-crit" in text  # the day cap, 1.80 of 2.00: 90 %
    assert "verified" in text and "first bad seq" not in text
    assert "openai" in text and "search" in text  # spend by connector today
    assert "reservation.committed" in text  # the last audit events
    assert 'action="/logout"' not in text  # a bearer header cannot be logged out
    assert_security_headers(r)


@pytest.mark.parametrize(
    "authorization",
    ["Bearer pm_admin_wrong", "Basic " + ADMIN_KEY, ADMIN_KEY, "Bearer " + "x" * 600, "Bearer"],
)
def test_a_bad_bearer_header_gets_the_login_form(client: TestClient, authorization: str) -> None:
    r = client.get("/", headers={"Authorization": authorization})
    assert r.status_code == 200
    assert 'name="admin_key"' in r.text and "writer" not in r.text


def test_a_service_key_is_not_an_admin_key(client: TestClient, world: World) -> None:
    key = create_service_key(world.authority, "team:growth")
    r = client.get("/", headers={"Authorization": f"Bearer {key}"})
    assert 'name="admin_key"' in r.text and "writer" not in r.text
    r = login(client, key)
    assert r.status_code == 401 and session_cookie(r) is None


def test_login_with_a_wrong_key_is_401_without_a_cookie(client: TestClient) -> None:
    r = login(client, "pm_admin_not-the-key")
    assert r.status_code == 401
    assert "not a valid admin key" in r.text
    assert 'name="admin_key"' in r.text
    assert session_cookie(r) is None
    assert "writer" not in client.get("/").text


def test_login_with_the_right_key_sets_a_session_cookie(client: TestClient, world: World) -> None:
    r = login(client)
    assert r.status_code == 303
    assert r.headers["location"] == "/"
    [header] = [h for h in set_cookies(r) if h.startswith("pm_session=")]
    attributes = [a.strip().lower() for a in header.split(";")]
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert "path=/" in attributes
    assert f"max-age={SESSION_TTL_SECONDS}" in attributes
    token = session_cookie(r)
    assert token and ADMIN_KEY not in token and ADMIN_KEY.removeprefix("pm_admin_") not in token
    page = client.get("/")
    assert page.status_code == 200
    assert "writer" in page.text and world.evil in page.text
    assert 'action="/logout"' in page.text


def test_login_needs_the_double_submit_token(client: TestClient, app: Starlette) -> None:
    client.get("/")  # the CSRF cookie is set…
    r = client.post("/login", data={"admin_key": ADMIN_KEY})  # …but the form lacks the field
    assert r.status_code == 403 and session_cookie(r) is None
    r = client.post("/login", data={"admin_key": ADMIN_KEY, "csrf": "forged.token"})
    assert r.status_code == 403 and session_cookie(r) is None
    # a field without the cookie (a cross-site form cannot send a SameSite=Strict cookie)
    token = csrf_of(client.get("/").text)
    with new_client(app) as fresh:
        r = fresh.post("/login", data={"admin_key": ADMIN_KEY, "csrf": token})
    assert r.status_code == 403 and session_cookie(r) is None


def test_login_ignores_other_content_types_and_huge_forms(client: TestClient) -> None:
    token = csrf_of(client.get("/").text)
    r = client.post("/login", json={"admin_key": ADMIN_KEY, "csrf": token})
    assert r.status_code == 403 and session_cookie(r) is None
    r = client.post("/login", data={"admin_key": "x" * 20_000, "csrf": token})
    assert r.status_code == 413 and session_cookie(r) is None


def _with_cookie(app: Starlette, path: str, token: str) -> Any:
    with new_client(app) as c:
        return c.get(path, headers={"Cookie": f"pm_session={token}".encode()})


def test_a_forged_or_altered_cookie_is_refused(client: TestClient, app: Starlette, world: World) -> None:
    token = session_cookie(login(client))
    assert token is not None
    assert "writer" in _with_cookie(app, "/", token).text
    version, expires, nonce, mac = token.split(".")
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    other_key = Sessions(tokens.generate_private_key()).issue(int(world.clock().timestamp()))
    for forged in (
        f"{version}.{expires}.{nonce}.{flipped}",
        f"{version}.{int(expires) + 3600}.{nonce}.{mac}",  # a longer life, same MAC
        f"{version}.{expires}.{nonce[:-1]}x.{mac}",
        other_key,  # signed by another authority
        ADMIN_KEY,
        "",
        "v1.1.2.3.4",
        "v1.²³.nonce.mac",
    ):
        r = _with_cookie(app, "/", forged)
        assert r.status_code == 200 and "writer" not in r.text and 'name="admin_key"' in r.text, forged
        assert _with_cookie(app, f"/agents/{world.writer}", forged).status_code == 401
        assert _with_cookie(app, "/v1/reports/focus?from=2026-03-01&to=2026-04-01", forged).status_code == 401


def test_a_session_expires_after_12_hours(client: TestClient, world: World) -> None:
    assert login(client).status_code == 303
    world.clock.advance(SESSION_TTL_SECONDS - 5)
    assert "writer" in client.get("/").text
    world.clock.advance(10)
    assert "writer" not in client.get("/").text


def test_logout_clears_the_cookie(client: TestClient, app: Starlette) -> None:
    token = session_cookie(login(client))
    page = client.get("/")
    r = client.post("/logout", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/"
    [header] = [h for h in set_cookies(r) if h.startswith("pm_session=")]
    assert 'pm_session=""' in header or "pm_session=;" in header
    assert "max-age=0" in header.lower()
    assert "writer" not in client.get("/").text
    assert token is not None
    assert "writer" not in _with_cookie(app, "/", token).text  # a copy of the cookie is dead too


def test_logout_needs_the_double_submit_token(client: TestClient) -> None:
    login(client)
    r = client.post("/logout", data={})
    assert r.status_code == 403 and session_cookie(r) is None
    assert "writer" in client.get("/").text


def test_login_returns_to_the_agent_page_asked_for(client: TestClient, world: World) -> None:
    r = client.get(f"/agents/{world.writer}")
    assert r.status_code == 401 and 'name="admin_key"' in r.text
    assert f'name="next" value="/agents/{world.writer}"' in r.text
    r = client.post(
        "/login", data={"admin_key": ADMIN_KEY, "csrf": csrf_of(r.text), "next": f"/agents/{world.writer}"}
    )
    assert r.status_code == 303 and r.headers["location"] == f"/agents/{world.writer}"


@pytest.mark.parametrize(
    "target", ["//evil.example", "https://evil.example/", "/\\evil.example", "/agents/../x"]
)
def test_login_never_redirects_elsewhere(client: TestClient, target: str) -> None:
    r = login(client, next=target)
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_get_login_goes_home(client: TestClient) -> None:
    r = client.get("/login")
    assert r.status_code == 303 and r.headers["location"] == "/"


# ---------------------------------------------------------------- pages


def test_values_are_html_escaped(client: TestClient, world: World) -> None:
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for path in ("/", f"/agents/{world.evil}"):
        r = client.get(path, headers=ADMIN)
        assert r.status_code == 200
        assert EVIL not in r.text
        assert escaped in r.text
        assert "<script" not in r.text.lower()  # no script at all, inline or not
        assert " style=" not in r.text  # nothing the CSP would have to allow inline
    agent_page = client.get(f"/agents/{world.evil}", headers=ADMIN).text
    assert "<b>growth</b>" not in agent_page and "&lt;b&gt;growth&lt;/b&gt;" in agent_page


def test_the_agent_page_shows_budgets_ledger_and_events(client: TestClient, world: World) -> None:
    r = client.get(f"/agents/{world.evil}", headers=ADMIN)
    assert r.status_code == 200
    text = r.text
    assert "Wallet" in text and "all · day" in text and "lvl-crit" in text
    assert "duplicate call" in text and "-0.50" in text and "1.50" in text  # the refund and the charge
    assert world.charge_id in text
    for kind in ("agent.created", "policy.changed", "budget.funded", "refund.created", "threshold_crossed"):
        assert kind in text, kind
    # a budget's events link to its agent's page
    assert f'<a href="/agents/{world.evil}"><code>{world.evil}/total</code></a>' in text
    assert "team:growth" in text
    assert world.writer not in text  # not the other agent's events
    assert_security_headers(r)


def test_an_unknown_agent_is_404(client: TestClient) -> None:
    r = client.get("/agents/ag_nobody", headers=ADMIN)
    assert r.status_code == 404
    assert "No such agent" in r.text
    r = client.get("/agents/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E", headers=ADMIN)
    assert r.status_code == 404
    assert "<img" not in r.text and "&lt;img src=x onerror=alert(1)&gt;" in r.text


def test_a_broken_audit_chain_names_its_first_bad_seq(client: TestClient, world: World) -> None:
    with sqlite3.connect(world.path) as conn:
        (text,) = conn.execute("SELECT event FROM events WHERE seq = 3").fetchone()
        event = json.loads(text)
        event["data"]["tampered"] = True
        conn.execute("UPDATE events SET event = ? WHERE seq = 3", (json.dumps(event),))
    r = client.get("/", headers=ADMIN)
    assert r.status_code == 200
    assert "broken" in r.text and "first bad seq" in r.text
    assert re.search(r"first bad seq <strong>3</strong>", r.text)


def test_static_files(client: TestClient) -> None:
    page = client.get("/", headers=ADMIN).text
    href = re.search(r'<link rel="stylesheet" href="([^"]+)"', page)
    assert href is not None and href.group(1).startswith("/ui/static/dashboard.css")
    r = client.get(href.group(1).replace("&amp;", "&"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    assert_security_headers(r)
    for missing in ("/ui/static/nope.js", "/ui/static/__init__.py", "/ui/static/dashboard.css%00"):
        r = client.get(missing)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
    assert client.get("/ui/static/..%2Fviews.py").status_code == 404


# ---------------------------------------------------------------- the FOCUS report


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_focus_report_is_the_focus_csv(client: TestClient, world: World) -> None:
    r = client.get("/v1/reports/focus?from=2026-03-01&to=2026-04-01", headers=ADMIN)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert 'filename="focus-2026-03-01-2026-04-01.csv"' in r.headers["content-disposition"]
    assert_security_headers(r)
    header = r.text.splitlines()[0].split(",")
    for column in focus.FOCUS_COLUMNS:
        assert column in header
    assert "x_AgentId" in header and "x_team" in header
    rows = _csv(r.text)
    assert sorted(row["ChargeCategory"] for row in rows) == ["Credit", "Usage", "Usage"]
    [credit] = [row for row in rows if row["ChargeCategory"] == "Credit"]
    [usage] = [row for row in rows if row["ServiceName"] == "openai" and row["ChargeCategory"] == "Usage"]
    assert usage["BilledCost"] == "1.50" and usage["ServiceName"] == "openai"
    assert credit["BilledCost"] == "-0.50" and credit["x_RefundOf"] == world.charge_id
    assert usage["x_AgentId"] == world.evil and usage["x_team"] == "<b>growth</b>"
    assert usage["BillingAccountId"] == "pm.test"
    # the same file as the one the CLI writes with reports/focus.py
    agents = {a["id"]: a for a in world.authority.list_agents()}
    out = io.StringIO()
    focus.write_csv(
        out,
        focus.columns(agents),
        focus.focus_rows(world.authority.ledger(), agents, billing_account_id="pm.test"),
    )
    assert r.text == out.getvalue()


def test_focus_report_keeps_to_its_period(client: TestClient) -> None:
    r = client.get("/v1/reports/focus?from=2026-03-11&to=2026-04-01", headers=ADMIN)
    assert r.status_code == 200 and _csv(r.text) == []
    # entries at 09:00:00Z exactly: outside [08:00Z, 10:00+01:00), inside [09:00Z, 09:30)
    r = client.get(
        "/v1/reports/focus?from=2026-03-10T08:00:00Z&to=2026-03-10T10:00:00%2B01:00", headers=ADMIN
    )
    assert r.status_code == 200 and _csv(r.text) == []
    r = client.get("/v1/reports/focus?from=2026-03-10T09:00:00Z&to=2026-03-10T09:30:00", headers=ADMIN)
    assert len(_csv(r.text)) == 3


def test_focus_report_with_a_session_cookie(client: TestClient) -> None:
    login(client)
    r = client.get("/v1/reports/focus?from=2026-03-01&to=2026-04-01")
    assert r.status_code == 200 and len(_csv(r.text)) == 3


def test_focus_report_requires_admin(client: TestClient, world: World) -> None:
    service = create_service_key(world.authority, "team:growth")
    for headers in ({}, {"Authorization": "Bearer pm_admin_wrong"}, {"Authorization": f"Bearer {service}"}):
        r = client.get("/v1/reports/focus?from=2026-03-01&to=2026-04-01", headers=headers)
        assert r.status_code == 401
        error = r.json()["error"]
        assert error["code"] == "admin_key_required"
        assert set(error) >= {
            "code",
            "message",
            "decision_id",
            "budget_id",
            "requested",
            "remaining",
            "currency",
        }
        assert_security_headers(r)


@pytest.mark.parametrize(
    "query",
    [
        "from=yesterday&to=2026-04-01",
        "from=2026-13-01&to=2026-14-01",
        "from=2026-03-01",
        "to=2026-03-01",
        "",
        "from=2026-04-01&to=2026-03-01",
        "from=2026-03-01&to=2026-03-01",
        "from=2026-03-01T25:00:00Z&to=2026-04-01",
    ],
)
def test_focus_report_bad_dates_are_422(client: TestClient, query: str) -> None:
    r = client.get(f"/v1/reports/focus?{query}", headers=ADMIN)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_request"


# ---------------------------------------------------------------- building blocks


def test_usage_levels_follow_the_50_75_90_thresholds() -> None:
    limit = parse_nanos("10.00")
    cases = [
        ("0", "ok"),
        ("4.99", "ok"),
        ("5.00", "warn"),
        ("7.49", "warn"),
        ("7.50", "high"),
        ("9.00", "crit"),
    ]
    for spent, expected in cases:
        assert charts.level(charts.used_bp(limit, parse_nanos(spent), 0)) == expected, spent
    assert charts.level(charts.used_bp(limit, parse_nanos("4.00"), parse_nanos("5.00"))) == "crit"
    assert charts.used_bp(0, 0, 0) is None and charts.level(None) == "none"
    assert charts.used_bp(0, 1, 0) == charts.FULL_BP
    assert charts.percent(charts.used_bp(limit, parse_nanos("0.005"), 0)) == "<1%"
    assert charts.used_bp(limit, 1, 0) == 0  # rounded down: a threshold is reached, never guessed
    over = charts.usage_bar(charts.used_bp(limit, parse_nanos("25.00"), 0), "b")
    assert 'class="fill" width="1000"' in over  # capped at full
    assert "." not in re.sub(r"<title>.*?</title>|aria-label=\"[^\"]*\"", "", over)  # integer geometry


def test_charts_escape_their_labels() -> None:
    chart = charts.bar_chart([(EVIL, 5), ("b", -2)], str, label=EVIL)
    assert EVIL not in chart and "&lt;script&gt;" in chart
    spark = charts.sparkline([0, 3, -1, 7], label=EVIL)
    assert EVIL not in spark and "<polyline" in spark
    assert charts.bar_chart([], str, label="x") == "" and charts.sparkline([], label="x") == ""


def test_sessions_unit() -> None:
    key = tokens.generate_private_key()
    sessions, again = Sessions(key), Sessions(key)
    token = sessions.issue(1_000)
    assert sessions.valid(token, 1_001) and again.valid(token, 1_001)  # every worker agrees
    assert not sessions.valid(token, 1_000 + SESSION_TTL_SECONDS)
    sessions.revoke(token, 1_002)
    assert not sessions.valid(token, 1_003)
    csrf = sessions.new_csrf()
    assert sessions.csrf_ok(csrf, csrf) and again.csrf_ok(csrf, csrf)
    assert not sessions.csrf_ok(csrf, sessions.new_csrf())
    assert not sessions.csrf_ok("a.b", "a.b") and not sessions.csrf_ok(None, csrf)
    assert not sessions.csrf_ok(csrf, "é" + csrf)
