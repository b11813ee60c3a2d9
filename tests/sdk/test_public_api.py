"""The public surface: ``paymaster.__all__`` is pinned, and importing the SDK never imports
the server's dependencies."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import subprocess
import sys
import textwrap

import paymaster
import paymaster.sdk
from paymaster import errors

PUBLIC = [
    "AdminKeyRequired",
    "AgentFrozen",
    "AgentKey",
    "AgentRevoked",
    "AgentUnknown",
    "AsyncClient",
    "AuthorityUnavailable",
    "BalanceInsufficient",
    "Client",
    "ConnectorBlocked",
    "FxRateUnknown",
    "IdempotencyConflict",
    "InvalidAmount",
    "InvalidRequest",
    "LoopDetected",
    "Money",
    "NoBudgetConfigured",
    "NotFound",
    "PaymasterError",
    "PerCallLimitExceeded",
    "PolicyCapExceeded",
    "PolicyDomainBlocked",
    "PriceStale",
    "PriceUnknown",
    "ReservationExpired",
    "ReservationSettled",
    "SpendDenied",
    "SpendTokenAmountExceeded",
    "SpendTokenExpired",
    "SpendTokenInvalid",
    "SpendTokenMissing",
    "SpendTokenReplayed",
    "TaskForbidden",
    "UpstreamFailed",
    "UpstreamUnavailable",
    "__version__",
    "async_governed_httpx_client",
    "governed_httpx_client",
]

SERVER_ONLY = ("starlette", "uvicorn", "psycopg", "psycopg_pool", "typer", "rich", "aiohttp", "genai_prices")


def test_all_is_pinned_and_sorted() -> None:
    assert paymaster.__all__ == PUBLIC
    assert paymaster.__all__ == sorted(paymaster.__all__)
    assert paymaster.sdk.__all__ == sorted(paymaster.sdk.__all__)


def test_every_public_name_resolves() -> None:
    namespace: dict[str, object] = {}
    exec("from paymaster import *", namespace)
    assert set(PUBLIC) <= set(namespace)
    for name in PUBLIC:
        assert getattr(paymaster, name) is namespace[name]
    assert set(PUBLIC) <= set(dir(paymaster))
    assert paymaster.Client is paymaster.sdk.Client
    assert paymaster.AgentKey is paymaster.sdk.AgentKey


def test_every_denial_class_is_public() -> None:
    denials = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value)
        and issubclass(value, errors.SpendDenied)
        and value is not errors.SpendDenied
    }
    assert denials == {cls.__name__ for cls in errors.ERROR_CLASSES.values()}
    assert denials <= set(paymaster.__all__)
    for name in denials:
        assert getattr(paymaster, name) is getattr(errors, name)


def test_version_is_the_distributions() -> None:
    assert paymaster.__version__ == importlib.metadata.version("paymaster")


def test_a_misspelt_name_is_an_attribute_error() -> None:
    try:
        paymaster.Clinet  # type: ignore[attr-defined]
    except AttributeError as exc:
        assert "Clinet" in str(exc)
    else:
        raise AssertionError("paymaster.Clinet resolved")


def imported_after(code: str) -> set[str]:
    """Top-level module names imported by ``code`` in a fresh interpreter."""
    script = (
        textwrap.dedent(code)
        + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_importing_paymaster_imports_no_server_dependency() -> None:
    loaded = imported_after("import paymaster")
    assert loaded.isdisjoint(SERVER_ONLY), sorted(loaded & set(SERVER_ONLY))
    assert "httpx" not in loaded  # the SDK itself loads on first use


def test_using_the_sdk_imports_no_server_dependency() -> None:
    code = """
    import paymaster
    key = paymaster.AgentKey.generate()
    paymaster.Client("http://127.0.0.1:8787").close()
    paymaster.AsyncClient("http://127.0.0.1:8787")
    paymaster.governed_httpx_client("http://127.0.0.1:8787", agent_id="ag_1", key=key).close()
    paymaster.async_governed_httpx_client("http://127.0.0.1:8787", agent_id="ag_1", key=key)
    import paymaster.sdk
    """
    loaded = imported_after(code)
    # httpx 0.28 imports its own command line (click, pygments, rich) from its __init__ when
    # those are installed; whatever a bare `import httpx` loads is not the SDK's doing.
    baseline = imported_after("import httpx")
    ours = loaded - baseline
    assert ours.isdisjoint(SERVER_ONLY), sorted(ours & set(SERVER_ONLY))
    assert loaded.isdisjoint(set(SERVER_ONLY) - {"rich"}), sorted(loaded & set(SERVER_ONLY))
    assert not any(m in loaded for m in ("paymaster.server", "paymaster.store", "paymaster.cli"))


def test_sdk_modules_do_not_import_the_server_layers() -> None:
    code = """
    import paymaster.sdk, sys
    bad = [m for m in sys.modules if m.startswith(("paymaster.server", "paymaster.store", "paymaster.cli",
           "paymaster.authority", "paymaster.bootstrap", "paymaster.config"))]
    assert not bad, bad
    """
    imported_after(code)
