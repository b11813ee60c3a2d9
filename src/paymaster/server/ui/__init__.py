"""The dashboard: server-rendered pages over the authority, for admins (docs/dashboard.md).

``routes(authority)`` is everything it serves; the app factory mounts it beside the API:

- ``GET /``: the overview for an admin (``Authorization: Bearer pm_admin_…`` or a session
  cookie), the login form for anyone else;
- ``POST /login`` (``admin_key``, ``csrf``) and ``POST /logout``; ``GET /login`` goes to ``/``;
- ``GET /agents/{id}``: one agent's budgets, ledger entries and events;
- ``GET /ui/static/{file}``: the stylesheet;
- ``GET /v1/reports/focus?from=&to=``: the FOCUS 1.0 CSV (admin key or session).

Every page is HTML without script, under ``Content-Security-Policy: default-src 'self'``
and ``X-Frame-Options: DENY``; charts are SVG drawn on the server (:mod:`.charts`).
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from paymaster.authority import Authority
from paymaster.server.ui.views import Dashboard

__all__ = ["routes"]


def routes(authority: Authority) -> list[BaseRoute]:
    ui = Dashboard(authority)
    return [
        Route("/", ui.index, methods=["GET"]),
        Route("/login", ui.login, methods=["POST"]),
        Route("/login", ui.login_get, methods=["GET"]),
        Route("/logout", ui.logout, methods=["POST"]),
        Route("/agents/{agent_id}", ui.agent, methods=["GET"]),
        Route("/ui/static/{file}", ui.static_file, methods=["GET"]),
        Route("/v1/reports/focus", ui.focus_report, methods=["GET"]),
    ]
