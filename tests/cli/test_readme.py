"""The README's five-minute tour, run as a reader would paste it, so that it cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TOUR_HEADING = "## Five-minute tour"


def tour_commands() -> list[str]:
    """The lines of the first fenced shell block under the tour's heading."""
    text = README.read_text(encoding="utf-8")
    assert TOUR_HEADING in text, f"README.md has no {TOUR_HEADING!r} section"
    section = text.split(TOUR_HEADING, 1)[1]
    match = re.search(r"^```(?:sh|bash|shell)\n(.*?)^```", section, re.S | re.M)
    assert match is not None, "the tour has no ```sh block"
    return [
        line for line in match.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def test_readme_starts_with_make_run_and_make_test() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[:6] == [
        "# Paymaster",
        "",
        "```",
        "make run     # set up, initialise the embedded database, serve the authority + gateway on :8787",
        "make test    # set up, run every test (SQLite, PostgreSQL when it answers), lint and type-check",
        "```",
    ]


def test_the_tour_covers_the_commands_it_promises() -> None:
    tour = "\n".join(tour_commands())
    for command in (
        "init",
        "agents create",
        "--key-out",
        "fund",
        "limits",
        "status",
        "ledger",
        "audit verify",
    ):
        assert f" {command}" in tour, command
    assert all(line.startswith(".venv/bin/paymaster ") for line in tour_commands())


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="the tour is a POSIX shell session")
def test_the_tour_runs(tmp_path: Path) -> None:
    venv = ROOT / ".venv"
    assert (venv / "bin" / "paymaster").exists(), "run `make venv` first"
    # The tour runs at the top of a checkout after `make venv`: a fresh directory with the
    # virtualenv in place stands in for it, so the repository's own .paymaster is untouched.
    (tmp_path / ".venv").symlink_to(venv, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMASTER_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "100"
    # One shell for the whole block, as when it is pasted (an `export` carries to the next
    # line); -e stops at the first failing line and -x names it in the output.
    script = "set -x\n" + "\n".join(tour_commands()) + "\n"
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    assert (tmp_path / ".paymaster" / "writer.pem").exists()
    assert (tmp_path / ".paymaster" / "focus.csv").read_text().startswith("BilledCost,")
