"""The docs cannot rot: every Python snippet of the README and the docs site runs, every `attnctl`
command line in them parses against the command's own options, and every public name has a docstring
that the generated API reference shows.

A snippet that cannot run offline says why in a `<!-- not run: REASON -->` line right above it.
"""

from __future__ import annotations

import inspect
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

import attnctl

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(
    r"^(<!-- not run: (?P<why>[^>]+) -->\n)?(?P<indent> *)```(?P<lang>\w*)\n(?P<code>.*?)\n(?P=indent)```",
    re.S | re.M,
)


def _blocks(lang: str) -> list:
    found = []
    for page in PAGES:
        for m in BLOCK.finditer(page.read_text(encoding="utf-8")):
            if m["lang"] == lang:
                line = page.read_text(encoding="utf-8")[: m.start("code")].count("\n") + 1
                code = textwrap.dedent(m["code"])
                found.append(pytest.param(code, m["why"], id=f"{page.relative_to(ROOT)}:{line}"))
    return found


@pytest.mark.parametrize(("code", "why"), _blocks("python"))
def test_python_snippet_runs(code, why, tmp_path, monkeypatch):
    if why:
        assert len(why.strip()) > 8, "a snippet left out of the test says why"
        return
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def _command_lines() -> list:
    lines = []
    for param in _blocks("bash"):
        code = param.values[0]
        for line in code.replace("\\\n", " ").splitlines():
            commands: list[list[str]] = [[]]
            for word in shlex.split(line, comments=True):
                if word in ("&&", ";", "|"):
                    commands.append([])
                else:
                    commands[-1].append(word)
            for words in commands:
                if words[:1] == ["attnctl"]:
                    lines.append(pytest.param(words[1:], id=f"{param.id}:{' '.join(words[:3])}"))
                elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["attnctl"]:
                    at = (
                        words.index("-m") + 2
                    )  # python -m attnctl ARGS, accelerate launch ... -m attnctl ARGS
                    lines.append(
                        pytest.param(words[at:], id=f"{param.id}:-m attnctl {' '.join(words[at : at + 1])}")
                    )
    return lines


@pytest.mark.parametrize("args", _command_lines())
def test_command_line_parses(args):
    """The command and every option exist with values of the right type (nothing runs)."""
    import typer

    from attnctl.cli import app

    command = typer.main.get_command(app)
    rest = list(args)
    while hasattr(command, "list_commands") and rest:
        sub = command.get_command(command.context_class(command), rest[0])
        assert sub is not None, f"no command {rest[0]!r} in `attnctl {' '.join(args)}`"
        command, rest = sub, rest[1:]
    if "-h" in rest or "--help" in rest:
        return
    ctx = command.make_context(command.name, rest, resilient_parsing=False)
    assert ctx is not None


def _public() -> list:
    names = [(attnctl, n) for n in attnctl.__all__]
    names += [(attnctl.headhunter, n) for n in attnctl.headhunter.__all__]
    names += [(attnctl.tiny, n) for n in attnctl.tiny.__all__]
    return [pytest.param(module, n, id=f"{module.__name__}.{n}") for module, n in names]


@pytest.mark.parametrize(("module", "name"), _public())
def test_public_names_are_documented(module, name):
    obj = getattr(module, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj)):
        return  # a constant: the module's docstring describes it
    assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
    if inspect.isclass(obj):
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not (
                inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod, property))
            ):
                continue
            if any(attr in vars(base) for base in obj.__mro__[1:]):
                continue  # an override: the base documents it
            assert inspect.getdoc(member), f"{module.__name__}.{name}.{attr} has no docstring"
    reference = (ROOT / "docs" / "reference" / "api.md").read_text(encoding="utf-8")
    shown = f"::: {module.__name__}.{name}" in reference or f"::: {module.__name__}\n" in reference
    assert shown, f"the API reference does not show {module.__name__}.{name}"
