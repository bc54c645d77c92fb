"""mkdocs build hook: the pages' generated parts, read from the code at build time, never copied.

`{{ families_table }}` / `{{ interop_table }}`: the support matrices (`attnctl families --markdown`,
`--interop`); `{{ cli_reference }}`: every command of the `attnctl` Typer app with its usage, help and
options; `{{ fields:NAME }}`: control NAME's fields with their defaults, rules and help
(`Control.fields()`); `{{ changelog }}`: CHANGELOG.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def families_table() -> str:
    from attnctl.families import ADAPTERS
    from attnctl.families.support import markdown

    return markdown(ADAPTERS)


def interop_table() -> str:
    from attnctl.families.support import interop_markdown

    return interop_markdown()


def cli_reference() -> str:
    """Markdown for every command of the Typer app, in the order `attnctl --help` lists them."""

    import typer

    from attnctl.cli import app

    root = typer.main.get_command(app)
    out: list[str] = []

    def walk(command: Any, path: list[str]) -> None:
        ctx = command.context_class(command, info_name=" ".join(path))
        if path != ["attnctl"]:
            out.append(f"## `{' '.join(path)}`\n")
            usage = " ".join(path + command.collect_usage_pieces(ctx))
            out.append(f"```\n{usage}\n```\n")
            if command.help:
                out.append(_escape(_dedent(command.help)) + "\n")
            rows = []
            for param in command.get_params(ctx):
                if getattr(param, "hidden", False) or param.name == "help":
                    continue
                record = param.get_help_record(ctx)
                if record is None:
                    continue
                names, help_text = record
                cell = _escape(help_text).replace("|", "\\|")
                rows.append(f"| `{names}` | {cell} |")
            if rows:
                out.append("| option | meaning |\n|---|---|\n" + "\n".join(rows) + "\n")
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, path + [name])

    walk(root, ["attnctl"])
    return "\n".join(out)


def fields_table(name: str) -> str:
    """A control's fields, defaults and rules, as `Control.fields()` declares them."""
    import json

    import attnctl

    rows = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    for spec in getattr(attnctl, name).fields():
        required = (spec.default is None and not spec.optional) or (spec.kind == "words" and spec.default == [])
        default = "required" if required else json.dumps(spec.default)
        cells = [f"`{spec.name}`", f"`{default}`", spec.allowed(), spec.help]
        rows.append("| " + " | ".join(_escape(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def changelog() -> str:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    return text.split("\n", 1)[1] if text.startswith("# ") else text  # the page has its own title


def _escape(text: str) -> str:
    """Help text as Markdown shows it literally: <i>.png is a file name, not a tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _dedent(text: str) -> str:
    import inspect

    return inspect.cleandoc(text)


GENERATED = {
    "{{ families_table }}": families_table,
    "{{ interop_table }}": interop_table,
    "{{ cli_reference }}": cli_reference,
    "{{ changelog }}": changelog,
}


FIELDS = re.compile(r"\{\{ fields:(\w+) \}\}")


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return FIELDS.sub(lambda m: fields_table(m.group(1)), markdown)
