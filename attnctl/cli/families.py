"""`attnctl families`: the support matrix, family × method."""

from __future__ import annotations

import typer


def families(
    markdown: bool = typer.Option(False, "--markdown", help="Print the Markdown table the README shows."),
    interop: bool = typer.Option(
        False,
        "--interop",
        help="The 'works with' table instead: compile, caches, LoRA, offload, dtype x method.",
    ),
) -> None:
    """Which method works on which model family: ✓ works (the tests run it on the family's tiny
    model), – does not apply to such a model, ✗ would apply but attnctl cannot do it (why below)."""
    from attnctl.families import ADAPTERS
    from attnctl.families.support import METHODS, SUPPORTED, matrix
    from attnctl.families.support import markdown as markdown_table

    if interop:
        from attnctl.families.support import interop_markdown

        typer.echo(interop_markdown())
        return
    if markdown:
        typer.echo(markdown_table(ADAPTERS))
        return
    width = max(len(a.name) for a in ADAPTERS)
    typer.echo(" " * width + "  " + " ".join(f"{m:<{len(m)}}" for m in METHODS))
    reasons: list[str] = []
    for adapter, row in matrix(ADAPTERS):
        cells = []
        for method, (mark, why) in row.items():
            if mark != SUPPORTED:
                reasons += [why] if why not in reasons else []
                mark = f"{mark}{reasons.index(why) + 1}"
            cells.append(f"{mark:<{len(method)}}")
        typer.echo(f"{adapter.name:<{width}}  " + " ".join(cells) + f"  {adapter.title}")
    typer.echo("")
    for i, why in enumerate(reasons, 1):
        typer.echo(f"{i}. {why}")
