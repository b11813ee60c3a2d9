"""Serving the app under uvicorn with uvloop and httptools, in one or several processes.

Several workers each import :func:`app_from_env` and read their settings from the
environment, so :func:`serve` exports the settings it was given before they start; they
share the one database (SQLite serialises their writers with ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import os

import uvicorn
from starlette.applications import Starlette

from paymaster.bootstrap import open_authority
from paymaster.config import Settings, load_settings
from paymaster.server.app import create_app

APP_FACTORY = "paymaster.server.run:app_from_env"


def app_from_env() -> Starlette:
    """The app, from ``PAYMASTER_*`` settings (the uvicorn factory: ``--factory``)."""
    return create_app(open_authority(load_settings()))


def export_settings(settings: Settings) -> None:
    """Put what workers need to rebuild ``settings`` into this process's environment."""
    env = {
        "PAYMASTER_DB": settings.db_url,
        "PAYMASTER_CONFIG": settings.config_path,
        "PAYMASTER_HOME": settings.home,
        "PAYMASTER_ADMIN_KEY": settings.admin_key,
        "PAYMASTER_AUDIT_SINK": settings.audit_sink,
    }
    for name, value in env.items():
        if value:
            os.environ[name] = value


def serve(
    settings: Settings, host: str | None = None, port: int | None = None, workers: int | None = None
) -> None:
    host = host or settings.host
    port = port if port is not None else settings.port
    workers = max(1, workers or settings.workers)
    if workers == 1:
        app = create_app(open_authority(settings))
        uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", lifespan="on")
        return
    # Migrate and make the signing key once, before the workers race to do it.
    open_authority(settings).store.close()
    export_settings(settings)
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        workers=workers,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
    )
