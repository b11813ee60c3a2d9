"""What every command shares: the ``--db``/``--config``/``--json`` options, opening the
authority, and parsing the command line's own value syntax (amounts, times, ``k=v``,
``ID=AMT/PERIOD``) into the authority's types.

Bad input is raised as the protocol's own errors (``invalid_amount``, ``invalid_request``,
``not_found``); ``cli.main`` turns any of them into one ``error: code: message`` line.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from paymaster.authority import Authority
from paymaster.bootstrap import open_authority
from paymaster.config import Settings, load_settings
from paymaster.errors import AuthorityUnavailable, InvalidRequest, NotFound
from paymaster.money import parse_nanos

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="PAYMASTER_DB",
        show_envvar=True,
        help="Database URL: sqlite:///PATH (default sqlite:///.paymaster/paymaster.db) or postgresql://…",
    ),
]
ConfigOption = Annotated[
    str | None,
    typer.Option("--config", envvar="PAYMASTER_CONFIG", show_envvar=True, help="Path of paymaster.toml."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

# Ledger pages read at a time by commands that walk the whole ledger (a FOCUS report).
LEDGER_PAGE = 5000


def settings(db: str | None, config: str | None, **overrides: Any) -> Settings:
    """The settings for one command: its flags, then ``PAYMASTER_*``, then the TOML file."""
    try:
        return load_settings(db=db, config=config, **overrides)
    except tomllib.TOMLDecodeError as exc:
        # config.py reports a broken --config itself, but not a broken ./paymaster.toml.
        raise InvalidRequest(f"paymaster.toml: {exc}") from exc
    except OSError as exc:
        raise InvalidRequest(f"cannot read the config file: {exc}") from exc


def sqlite_file(settings: Settings) -> Path | None:
    """The database file of an ``sqlite:///`` URL, ``None`` for other databases."""
    url = settings.db_url
    if not url.startswith("sqlite:"):
        return None
    if not url.startswith("sqlite:///") or url == "sqlite:///":
        raise InvalidRequest(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://…")
    return Path(url.removeprefix("sqlite:///"))


def require_initialized(settings: Settings) -> None:
    """Refuse to run against a database ``init`` never made.

    Opening the authority would otherwise create an empty database at a mistyped path, or
    a fresh authority key that cannot verify the audit log signed with the old one.
    """
    path = sqlite_file(settings)
    if path is not None and not path.exists():
        raise NotFound(f"no database at {path}: run `paymaster init` first, or pass --db")
    key = settings.signing_key_path
    if not key.exists():
        raise AuthorityUnavailable(
            f"the authority key {key} is missing: restore it, or set PAYMASTER_HOME to where it is"
        )


@contextmanager
def opened(settings: Settings) -> Iterator[Authority]:
    """An authority on an initialised database, closed (writer thread joined) on exit."""
    require_initialized(settings)
    authority = open_authority(settings)
    try:
        yield authority
    finally:
        authority.store.close()


# ---------------------------------------------------------------- values


def amount(text: str, option: str, *, allow_zero: bool = True) -> int:
    """A decimal string in nanos; ``invalid_amount`` names the option it came from."""
    return parse_nanos(text, field=option, allow_zero=allow_zero)


def optional_amount(text: str | None, option: str) -> int | None:
    return None if text is None else amount(text, option)


def time_bound(text: str | None, option: str) -> str | None:
    """A date (``2026-11-24``, midnight UTC) or an RFC 3339 time, as the database's text form.

    Times in the database are RFC 3339 UTC with microseconds, compared as strings, so the
    bound must be in exactly that form to compare correctly.
    """
    if text is None:
        return None
    return instant(text, option).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def instant(text: str, option: str) -> datetime:
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        at = datetime.fromisoformat(text)
        # A time without an offset is read as UTC, the zone every stored time is in.
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(
            f"{option} {text!r} is not a date (YYYY-MM-DD) or an RFC 3339 time (2026-11-24T13:00:00Z)"
        ) from None


def pairs(items: Sequence[str] | None, option: str) -> dict[str, str]:
    """``k=v`` items (``--meta team=growth``); the value may itself contain ``=``."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"{option} {item!r} must be KEY=VALUE")
        out[key.strip()] = value
    return out


def limit_specs(items: Sequence[str] | None, option: str) -> dict[str, tuple[int, str]]:
    """``ID=AMT/PERIOD`` items (``--connector openai=2.00/day``) as ``{id: (nanos, period)}``.

    The id is split off at the last ``=`` and the period at the ``/``: neither an amount
    nor a period contains either character, whatever the id contains.
    """
    out: dict[str, tuple[int, str]] = {}
    for item in items or ():
        ident, sep, rest = item.rpartition("=")
        value, slash, period = rest.partition("/")
        if not sep or not ident or not slash or not period:
            raise InvalidRequest(f"{option} {item!r} must be ID=AMOUNT/PERIOD, e.g. openai=2.00/day")
        out[ident] = (amount(value, f"{option} {ident}"), period)
    return out


def resolve_agent(authority: Authority, ref: str) -> str:
    """An agent id from an id or a unique name, so people can type the name they chose."""
    if ref.startswith("ag_"):
        try:
            return authority.agent(ref).id
        except NotFound:
            pass
    matches = [a["id"] for a in authority.list_agents() if a["name"] == ref]
    if len(matches) == 1:
        return str(matches[0])
    if not matches:
        raise NotFound(f"no agent with id or name {ref!r}")
    raise InvalidRequest(f"{len(matches)} agents are named {ref!r}; use an id: {', '.join(matches)}")


def iter_ledger(
    authority: Authority,
    *,
    agent: str | None = None,
    connector: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Every ledger entry matching the filters, in (time, id) order, a page at a time.

    The authority pages by ``since`` (inclusive) only, so each next page starts at the last
    time seen and skips the entries of that instant already yielded; when a whole page
    shares one instant, the next page is made larger, so the walk always advances.
    """
    cursor = since
    seen_at_cursor: set[str] = set()
    while True:
        size = LEDGER_PAGE + len(seen_at_cursor)
        rows = authority.ledger(agent=agent, connector=connector, since=cursor, until=until, limit=size)
        for row in rows:
            if row["id"] not in seen_at_cursor:
                yield row
        if len(rows) < size:
            return
        last = str(rows[-1]["time"])
        at_last = {str(r["id"]) for r in rows if r["time"] == last}
        seen_at_cursor = seen_at_cursor | at_last if last == cursor else at_last
        cursor = last
