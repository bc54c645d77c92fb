"""The `attnctl` command (Typer): one module per command group, their shared helpers in `common`.

Nothing in attnctl imports this package but `__main__`; the console script calls `main`.
"""

from __future__ import annotations

import typer

from . import bench, families, generate, headhunter, layers, testbed, ui

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Precise attention control for diffusers.",
    context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it
)
app.add_typer(bench.app, name="bench")
app.command("generate")(generate.generate)
app.command("ui")(ui.ui)
app.command("layers")(layers.layers)
app.command("headhunter")(headhunter.headhunter)
app.command("families")(families.families)
app.add_typer(testbed.app, name="testbed")


def _print_version(value: bool) -> None:
    if value:
        from attnctl import __version__

        typer.echo(f"attnctl {__version__}")
        raise typer.Exit()


@app.callback()
def _entry(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    from attnctl.pipelines import quiet

    quiet()  # commands print only what the user asked for


def main(args: list[str] | None = None) -> None:
    """The `attnctl` command: a bad option value ends in one `error:` line (status 2), not a box."""
    import sys

    try:
        code = app(args=args, prog_name="attnctl", standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except typer.TyperException as e:  # typer's own click: usage errors and bad parameters
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if not message:  # a bare command group: its help was printed, nothing went wrong
            sys.exit(0)
        typer.echo(f"error: {message}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
