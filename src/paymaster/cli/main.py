"""``paymaster``: the command line (PROTOCOL.md, "Command line"). A thin shell: each command
parses its input, calls the authority on the database directly, and hands the result to
``cli.render``.

Every failure ends the same way: one line ``error: <code>: <message>`` on stderr and exit
code 2 for bad input and refusals (the protocol's 4xx), 1 when the database or server is
unavailable (5xx). ``audit verify`` exits 3 when the chain is broken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from paymaster.cli import render
from paymaster.cli.commands import agents, demo, money, records, setup
from paymaster.errors import PaymasterError, SpendDenied
from paymaster.store.base import StoreUnavailable

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 1


def exit_code(status: int) -> int:
    return EXIT_UNAVAILABLE if status >= 500 else EXIT_BAD_INPUT


class PaymasterGroup(TyperGroup):
    """The root command: runs a command and turns any failure into the one-line error.

    Catching here, around the whole invocation, covers typer's own usage errors (a missing
    option, an unknown command) as well as the authority's refusals, and works the same
    under ``paymaster`` and under a test runner that invokes the app.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        code = 0
        try:
            # Not standalone: typer hands back a command's exit code instead of exiting, and
            # lets exceptions through to the handlers below instead of printing them itself.
            result = super().main(
                args=args,
                prog_name=prog_name or "paymaster",
                complete_var=complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
            code = result if isinstance(result, int) else 0
        except typer.TyperException as exc:
            # typer's (vendored click's) usage errors all derive from TyperException.
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
                help_text = ctx.get_help()  # rich help prints itself and returns ""
                if help_text:
                    render.raw_out(help_text + "\n")
            else:
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                render.error("invalid_request", exc.format_message() + hint)
            code = EXIT_BAD_INPUT
        except SpendDenied as exc:
            render.error(exc.code, exc.message)
            code = exit_code(exc.status)
        except StoreUnavailable as exc:
            render.error("authority_unavailable", str(exc))
            code = EXIT_UNAVAILABLE
        except PaymasterError as exc:
            render.error("invalid_request", str(exc))
            code = EXIT_BAD_INPUT
        except typer.Abort:
            render.error("aborted", "aborted")
            code = EXIT_UNAVAILABLE
        if standalone_mode:
            raise SystemExit(code)
        return code


app = typer.Typer(
    cls=PaymasterGroup,
    name="paymaster",
    help="Paymaster, the spend authority for AI agents. Commands work on the database directly;"
    " `serve` runs the API and the gateway.",
    no_args_is_help=True,
    add_completion=False,
    # Markdown: docstring paragraphs are reflowed to the terminal instead of keeping their line breaks.
    rich_markup_mode="markdown",
    # Plain tracebacks for bugs: pretty ones would print local variables, keys included.
    pretty_exceptions_enable=False,
)

app.command("init")(setup.init)
app.command("serve")(setup.serve)
app.add_typer(agents.app, name="agents")
app.add_typer(agents.keys_app, name="keys")
app.command("fund")(money.fund)
app.command("limits")(money.limits)
app.command("status")(money.status)
app.command("ledger")(records.ledger)
app.add_typer(records.audit_app, name="audit")
app.add_typer(records.report_app, name="report")
app.command("demo")(demo.demo)


def main() -> None:
    """The ``paymaster`` console script."""
    app()


if __name__ == "__main__":
    main()
