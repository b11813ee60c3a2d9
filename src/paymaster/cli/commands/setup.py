"""``paymaster init`` and ``paymaster serve``."""

from __future__ import annotations

from typing import Annotated

import typer

from paymaster import bootstrap
from paymaster.cli import render
from paymaster.cli.commands import common
from paymaster.errors import AuthorityUnavailable


def init(
    db: common.DbOption = None, config: common.ConfigOption = None, json: common.JsonOption = False
) -> None:
    """Create the database, the authority key and an admin key: whatever is missing.

    Idempotent: running it again changes nothing and never replaces a key. A new admin key
    is printed once, now; with PAYMASTER_ADMIN_KEY set, that key is stored (hashed) instead.
    """
    settings = common.settings(db, config)
    common.sqlite_file(settings)  # an unusable URL is bad input, before anything is written
    result = bootstrap.init(settings)
    # Only the key's path is ever shown: the authority's private key is never printed.
    info = {
        "db": result.db_url,
        "signing_key_path": result.signing_key_path,
        "signing_key_created": result.signing_key_created,
        "admin_key": result.admin_key,
        "admin_key_source": result.admin_key_source,
    }
    if json:
        render.json_out(info)
    else:
        render.init_done(info)


def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8787,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Serve the authority API, the gateway and the dashboard (runs until stopped)."""
    settings = common.settings(db, config, host=host, port=port, workers=workers)
    try:
        # Imported here: the server stack (Starlette, uvicorn) is needed by this command only.
        from paymaster.server.run import serve as run_server  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise AuthorityUnavailable(f"the server cannot start: {exc}") from exc
    url = f"http://{settings.host}:{settings.port}"
    if json:
        render.json_out({"serving": url, "db": settings.db_url, "workers": settings.workers})
    else:
        render.serving(url, settings.db_url, settings.workers)
    run_server(settings, settings.host, settings.port, settings.workers)
