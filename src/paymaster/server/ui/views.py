"""The dashboard's endpoints. Blocking reads (key lookups, the authority's queries) run on
a worker thread; session cookies and CSRF tokens are checked on the event loop (an HMAC)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from importlib import resources

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from paymaster.authority import Authority
from paymaster.bootstrap import lookup_api_key
from paymaster.errors import AdminKeyRequired, InvalidRequest, NotFound
from paymaster.server.ui import data, pages, report, respond
from paymaster.server.ui.html import Chrome
from paymaster.server.ui.session import CSRF_COOKIE, CSRF_FIELD, SESSION_COOKIE, Sessions

__all__ = ["Access", "Dashboard", "StaticFile"]

_MAX_KEY_LENGTH = 512
_NEXT = re.compile(r"/agents/[A-Za-z0-9_.:-]{1,200}")
STATIC_FILES = {"dashboard.css": "text/css; charset=utf-8"}
# A page is rendered from its frame and the browser's CSRF token.
PageFn = Callable[[Chrome, str], str]


class Access(Enum):
    BEARER = "bearer"
    SESSION = "session"


@dataclass(frozen=True)
class StaticFile:
    content: bytes
    media_type: str
    version: str


def load_static() -> dict[str, StaticFile]:
    files = {}
    for name, media_type in STATIC_FILES.items():
        content = resources.files("paymaster.server.ui").joinpath(name).read_bytes()
        files[name] = StaticFile(content, media_type, hashlib.sha256(content).hexdigest()[:12])
    return files


def _bearer(value: str | None) -> str | None:
    """The key of ``Authorization: Bearer KEY``, or ``None``."""
    if value is None:
        return None
    scheme, _, key = value.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > _MAX_KEY_LENGTH:
        return None
    return key


def is_admin_key(authority: Authority, key: str | None) -> bool:
    """Blocking: reads the stored key hashes."""
    if not key or len(key) > _MAX_KEY_LENGTH:
        return False
    found = lookup_api_key(authority, key)
    return found is not None and found[0] == "admin"


class Dashboard:
    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.sessions = Sessions(authority.signing_key)
        self.audit = data.AuditCache()
        self.static = load_static()
        css = self.static["dashboard.css"]
        self.stylesheet = f"/ui/static/dashboard.css?v={css.version}"

    # ------------------------------------------------------------ who is asking

    def _now(self) -> int:
        return int(self.authority.clock().timestamp())

    async def access(self, request: Request) -> Access | None:
        """The bearer admin key wins; otherwise a valid session cookie; otherwise nobody."""
        key = _bearer(request.headers.get("authorization"))
        if key is not None and await run_in_threadpool(is_admin_key, self.authority, key):
            return Access.BEARER
        if self.sessions.valid(request.cookies.get(SESSION_COOKIE), self._now()):
            return Access.SESSION
        return None

    def _csrf(self, request: Request) -> tuple[str, bool]:
        """The browser's CSRF token when it is ours, else a new one (and ``True``: set it)."""
        current = request.cookies.get(CSRF_COOKIE)
        if current is not None and self.sessions.csrf_signed(current):
            return current, False
        return self.sessions.new_csrf(), True

    def _page(self, request: Request, who: Access | None, render: PageFn, status: int = 200) -> Response:
        csrf, fresh = self._csrf(request)
        chrome = Chrome(
            self.authority.settings.authority_id,
            self.stylesheet,
            csrf=csrf if who is Access.SESSION else None,
            signed_in=who is not None,
        )
        response = respond.html(render(chrome, csrf), status)
        if fresh:
            respond.set_csrf(response, request, csrf)
        return response

    def _login(
        self, request: Request, status: int, *, error: str | None = None, next_path: str | None = None
    ) -> Response:
        def render(chrome: Chrome, csrf: str) -> str:
            return pages.login_page(chrome, csrf, error=error, next_path=next_path)

        return self._page(request, None, render, status)

    # ------------------------------------------------------------ pages

    async def index(self, request: Request) -> Response:
        who = await self.access(request)
        if who is None:
            return self._login(request, 200)
        view = await run_in_threadpool(data.overview, self.authority, self.audit)
        return self._page(request, who, lambda chrome, _: pages.overview_page(view, chrome))

    async def agent(self, request: Request) -> Response:
        agent_id = str(request.path_params["agent_id"])
        who = await self.access(request)
        if who is None:
            next_path = f"/agents/{agent_id}"
            return self._login(request, 401, next_path=next_path if _NEXT.fullmatch(next_path) else None)
        try:
            view = await run_in_threadpool(data.agent_view, self.authority, agent_id)
        except NotFound:
            return self._page(
                request, who, lambda chrome, _: pages.message_page("No such agent", agent_id, chrome), 404
            )
        return self._page(request, who, lambda chrome, _: pages.agent_page(view, chrome))

    # ------------------------------------------------------------ login / logout

    async def login(self, request: Request) -> Response:
        try:
            form = await respond.read_form(request)
        except respond.FormTooLarge:
            return self._login(request, 413, error="The form is too large.")
        next_path = form.get("next")
        next_path = next_path if next_path is not None and _NEXT.fullmatch(next_path) else None
        if not self.sessions.csrf_ok(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            return self._login(
                request, 403, error="The form expired or came from elsewhere: try again.", next_path=next_path
            )
        key = form.get("admin_key", "").strip()
        if not await run_in_threadpool(is_admin_key, self.authority, key):
            return self._login(request, 401, error="That is not a valid admin key.", next_path=next_path)
        response = respond.secured(RedirectResponse(next_path or "/", status_code=303))
        respond.set_session(response, request, self.sessions.issue(self._now()), self.sessions.ttl_seconds)
        # a new CSRF token for the signed-in browser: the one of the login form is spent
        respond.set_csrf(response, request, self.sessions.new_csrf())
        return response

    async def login_get(self, request: Request) -> Response:
        return respond.secured(RedirectResponse("/", status_code=303))

    async def logout(self, request: Request) -> Response:
        try:
            form = await respond.read_form(request)
        except respond.FormTooLarge:
            form = {}
        if not self.sessions.csrf_ok(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            who = await self.access(request)
            return self._page(
                request,
                who,
                lambda chrome, _: pages.message_page(
                    "Not logged out", "The form expired or came from elsewhere: try again.", chrome
                ),
                403,
            )
        self.sessions.revoke(request.cookies.get(SESSION_COOKIE), self._now())
        response = respond.secured(RedirectResponse("/", status_code=303))
        respond.clear_session(response, request)
        return response

    # ------------------------------------------------------------ files and reports

    async def static_file(self, request: Request) -> Response:
        found = self.static.get(str(request.path_params["file"]))
        if found is None:
            return respond.error_json(NotFound(f"no static file {request.path_params['file']}"))
        response = Response(found.content, media_type=found.media_type)
        return respond.secured(response, cache="public, max-age=86400")

    async def focus_report(self, request: Request) -> Response:
        if await self.access(request) is None:
            return respond.error_json(
                AdminKeyRequired("this route needs Authorization: Bearer pm_admin_… or a dashboard session")
            )
        try:
            period = report.parse_period(request.query_params)
        except InvalidRequest as exc:
            return respond.error_json(exc)
        # read before the first byte is sent, so a store that cannot answer is still an
        # error status rather than a cut-off 200
        agents = await run_in_threadpool(report.agents_by_id, self.authority)
        response = StreamingResponse(
            report.csv_chunks(self.authority, period, agents),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{report.filename(period)}"'},
        )
        return respond.secured(response)
