"""Bad-input audit: over a thousand bad inputs to the Python API, the command, the web demo and the
head search, each outcome classified (issue #25, "reliability").

  clear    one error of the intended type (ValueError; for the command a nonzero exit with one
           `error:` line and no traceback) whose one-line message names the field, flag or value
  silent   accepted with no error, or a NaN image
  obscure  a traceback, another exception type, a message of several lines (or thousands of
           characters), one that names none of the field, flag or value, or one in Python's own words
           ("unexpected keyword argument", "invalid literal for int()", ...)
  hang     still running after the per-case time limit (--timeout)
  valid    accepted, and rightly so: listed among the bad inputs, but valid (the reason is recorded)

Python API and head-search cases run in this process (a control's construction or from_dict is
instant; what a control accepts is then run for two steps on a tiny model, so that an error at install
or a NaN image counts too). Command cases run in child processes, each with its time limit: forked
from this process after attnctl, torch and diffusers are imported (a fresh interpreter takes 10-20 s
to import them on a shared CPU), each calling the command's entry point as `python -m attnctl` does;
`--exec-check N` runs N of them again as real `python -m attnctl` processes and compares. Web demo
cases call the demo's `generate` endpoint function in this process, on the bundled testbed model (the
`attnctl ui` default), as a request would; their time limit is the server's own (`Limits.max_seconds`).

    python benchmarks/audit.py --threads 1 --exec-check 6 --json benchmarks/results/audit.json

(`--before OLD.json --before-label TEXT` keeps a previous run's counts, e.g. on the code before a fix,
under "before" in the JSON.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import signal
import stat
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

AREAS = ("api", "cli", "demo", "headhunter")
OUTCOMES = ("clear", "silent", "obscure", "hang", "valid")
INT_MAX = 2**63 - 1
# Python's own words: an error that shows them was not written for the user
INTERNAL = (
    "__init__",
    "Traceback",
    "unexpected keyword argument",
    "positional argument",
    "codec can't",
    "Exceeds the limit",
    "invalid literal for int()",
    "could not convert",
    "not subscriptable",
    "is not iterable",
    "has no attribute",
    "unhashable type",
    "not supported between",
    "Overflow when unpacking",
    "int too large",
    "maximum recursion depth",
    "object is not callable",
    "[Errno",
)
LONG_MESSAGE = 2000  # characters: a "one-line" message longer than this is not readable
MISSING = object()
NO_CONTROLS = "an empty controls file is no controls (Control.list_from_json('') is [])"
PROMPT = "a cat and a frog"  # the tiny models' prompt
TESTBED_PROMPT = "a red circle and a blue square"
MID = "mid_block.attentions.0.transformer_blocks.0.attn1"
# the fewest values each control needs to be built (tests/test_fields.py's REQUIRED)
REQUIRED: dict[str, dict[str, Any]] = {
    "AttentionMaps": {},
    "AttentionRegulation": {"targets": ["cat"]},
    "AttendAndExcite": {"tokens": ["cat"]},
    "AStar": {"concepts": ["cat", "frog"]},
    "SoftPAG": {"heads": [f"{MID}:0"]},
    "PAG": {"layers": ["mid_block"]},
    "Layout": {"regions": [{"box": [0, 0, 0.5, 1], "prompt": "a cat"}]},
    "DraftAttention": {},
}


# ---- cases and their outcomes ----------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    area: str
    group: str  # e.g. "AStar.scale (JSON)"
    input: str  # what was tried, as shown in the report
    run: Callable[[], Any] | None = None  # in-process: raises, or returns (arrays are checked for NaN)
    argv: list[str] | None = None  # a command case
    names: tuple[str, ...] = ()  # the message must name one of these (any case)
    expect: tuple[type, ...] = (ValueError,)
    valid: str | None = None  # why acceptance is right
    timeout: float | None = None


@dataclasses.dataclass
class Outcome:
    area: str
    group: str
    input: str
    outcome: str
    why: str
    message: str
    seconds: float


class _Hang(BaseException):
    pass


def judge_message(message: str, names: tuple[str, ...]) -> str | None:
    """Why a message is not a clear one (None: it is)."""
    text = message.strip()
    if not text:
        return "an empty message"
    if "\n" in text:
        return f"a message of {text.count(chr(10)) + 1} lines"
    if len(text) > LONG_MESSAGE:
        return f"a message of {len(text)} characters"
    internal = [w for w in INTERNAL if w in text]
    if internal:
        return f"Python's own words in the message ({internal[0]!r})"
    if names and not any(n.lower() in text.lower() for n in names):
        return f"the message names none of {', '.join(map(repr, names))}"
    return None


def run_in_process(case: Case, timeout: float) -> Outcome:
    """Run an in-process case under a time limit (SIGALRM) and classify what it did."""

    def alarm(signum, frame):
        raise _Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, case.timeout or timeout)
    start = time.perf_counter()
    nan_warning = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                value = case.run()
        nan_warning = any("invalid value encountered" in str(w.message) for w in caught)
        error: BaseException | None = None
    except _Hang:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return _outcome(case, "hang", f"still running after {case.timeout or timeout:g} s", "", start)
    except BaseException as e:  # noqa: BLE001 - every exception is classified
        if isinstance(e, KeyboardInterrupt):
            raise
        error, value = e, None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if error is None:
        if _has_nan(value) or nan_warning:
            return _outcome(case, "silent", "accepted: the image is NaN", "", start)
        if case.valid:
            return _outcome(case, "valid", f"accepted: {case.valid}", "", start)
        return _outcome(case, "silent", "accepted", "", start)
    message = getattr(error, "message", None) or str(error)  # gradio's Error keeps its text in .message
    if "ran past this server's" in message:  # the web demo's own time limit (Limits.max_seconds)
        return _outcome(case, "hang", "stopped by the server's time limit", message, start)
    if message.startswith("generation failed:"):  # the web demo's answer to an unexpected exception
        return _outcome(case, "obscure", "an unexpected exception (the demo's catch-all)", message, start)
    if not isinstance(error, case.expect):
        wanted = " or ".join(t.__name__ for t in case.expect)
        tb = traceback.extract_tb(error.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        return _outcome(case, "obscure", f"{type(error).__name__} at {where}, not {wanted}", message, start)
    why = judge_message(message, case.names)
    return _outcome(case, "obscure" if why else "clear", why or type(error).__name__, message, start)


def _has_nan(value: Any) -> bool:
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return not bool(np.isfinite(value).all())
    return False


def _outcome(case: Case, outcome: str, why: str, message: str, start: float) -> Outcome:
    return Outcome(
        case.area, case.group, case.input, outcome, why, _short(message, 600), time.perf_counter() - start
    )


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


# ---- command cases: forked children --------------------------------------------------------------
SERVING = "attnctl ui: serving on"


def run_command(case: Case, timeout: float, workdir: Path) -> Outcome:
    """`attnctl ARGS` in a forked child (stdout and stderr to files), under a time limit."""
    start = time.perf_counter()
    out_path, err_path = workdir / "case.out", workdir / "case.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: the command, as `python -m attnctl ARGS` runs it
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.chdir(workdir)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                from attnctl.cli import main

                try:
                    main(list(case.argv or []))
                    code = 0
                except SystemExit as e:
                    if e.code is None or isinstance(e.code, int):
                        code = e.code or 0
                    else:
                        print(e.code, file=sys.stderr)
                        code = 1
            except BaseException:  # noqa: BLE001 - what Python prints for an uncaught exception
                traceback.print_exc()
                code = 1
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
    limit = case.timeout or timeout
    status, served = None, False
    while time.perf_counter() - start < limit:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
            break
        if SERVING in out_path.read_text(errors="replace"):
            served = True
            break
        time.sleep(0.05)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    return _judge_command(case, status, served, stdout, stderr, start, limit)


def _judge_command(
    case: Case, status: int | None, served: bool, stdout: str, stderr: str, start: float, limit: float
) -> Outcome:
    output = (stderr + stdout).strip()
    if served:
        if case.valid:
            return _outcome(case, "valid", f"accepted: {case.valid}", stdout.strip(), start)
        return _outcome(case, "silent", "accepted: the server started", stdout.strip(), start)
    if status is None:
        return _outcome(case, "hang", f"still running after {limit:g} s", output[-600:], start)
    if status == 0:
        if case.valid:
            return _outcome(case, "valid", f"accepted: {case.valid}", output, start)
        return _outcome(case, "silent", "accepted (exit status 0)", output, start)
    if "Traceback" in output:
        last = output.strip().splitlines()[-1]
        return _outcome(case, "obscure", "a traceback", last, start)
    errors = [line for line in stderr.strip().splitlines() if line.strip()]
    if not errors:
        return _outcome(case, "obscure", f"exit status {status} and no error message", output, start)
    message = "\n".join(errors)
    if not errors[0].startswith("error: "):
        return _outcome(case, "obscure", "the error does not start with 'error: '", message, start)
    why = judge_message(message, case.names)
    return _outcome(case, "obscure" if why else "clear", why or f"exit status {status}", message, start)


def run_exec(case: Case, timeout: float, workdir: Path) -> Outcome:
    """The same command case as a real `python -m attnctl` process."""
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    limit = (case.timeout or timeout) + 60  # a fresh interpreter imports torch and diffusers first
    try:
        done = subprocess.run(
            [sys.executable, "-m", "attnctl", *(case.argv or [])],
            capture_output=True,
            text=True,
            errors="replace",
            cwd=workdir,
            env=env,
            timeout=limit,
            check=False,
        )
        return _judge_command(case, done.returncode, False, done.stdout, done.stderr, start, limit)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return _judge_command(case, None, SERVING in out, out, "", start, limit)


# ---- shared state: tiny pipelines, files -----------------------------------------------------------
class Context:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self._pipes: dict[str, Any] = {}
        self._app: Any = None
        self.timeout = 20.0

    def pipe(self, family: str) -> Any:
        if family not in self._pipes:
            if family == "testbed":
                from attnctl.pipelines import load_pipeline

                pipe = load_pipeline(None)
            else:
                from attnctl.tiny import tiny_pipeline

                pipe = tiny_pipeline(family)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[family] = pipe
        return self._pipes[family]

    def file(self, name: str, content: str | bytes) -> str:
        path = self.dir / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def device(self) -> str:
        """A character device like /dev/null, made here: an output case may replace it, never the
        system's (falls back to a FIFO where devices cannot be made)."""
        path = self.dir / "files" / "null-device"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            except OSError:
                os.mkfifo(path)
        return str(path)

    def folder(self, name: str) -> str:
        path = self.dir / "files" / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)


def run_controls(ctx: Context, controls: list[Any], family: str = "sd", prompt: str = PROMPT) -> Any:
    """Two steps of a tiny model with the controls: the images, as floats (NaN shows)."""
    import torch

    import attnctl
    from attnctl.tiny import tiny_call_kwargs

    pipe = ctx.pipe(family)
    kwargs = tiny_call_kwargs(family, num_inference_steps=2, output_type="np")
    with attnctl.control(pipe, *controls):
        out = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    return getattr(out, "images", None) if getattr(out, "images", None) is not None else out.frames


# ---- the Python API --------------------------------------------------------------------------------
@dataclasses.dataclass
class Bad:
    label: str
    py: Any = MISSING  # the Python value (MISSING: JSON only)
    raw: str | None = None  # the JSON text of the value (default: json.dumps(py))
    valid: str | None = None
    names: tuple[str, ...] = ()  # more words the message may name instead of the field


def _json_text(value: Any) -> str | None:
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return None


def field_values(cls: type, spec: Any) -> list[Bad]:
    """Bad values of one field, by its kind and rule."""
    kind = spec.kind
    out = [
        Bad("a word", "x"),
        Bad("an empty string", ""),
        Bad("nested junk", [[{"a": [None, "x"]}]]),
        Bad("a dict of junk", {"a": {"b": [1, "x"]}}),
        Bad("an object()", object()),
    ]
    if not spec.optional:
        out.append(Bad("None", None))
    if kind != "bool":
        out.append(Bad("True", True))
    if kind not in ("data",):
        out += [Bad("an empty list", []), Bad("an empty dict", {})]
    if kind in ("number", "integer"):
        out += [
            Bad("inf", math.inf, "Infinity"),
            Bad("-inf", -math.inf, "-Infinity"),
            Bad("nan", math.nan, "NaN"),
            Bad("1e400 (JSON: inf)", raw="1e400"),
            Bad("-1e400 (JSON)", raw="-1e400"),
            Bad("10**30", 10**30),
            Bad("-10**30", -(10**30)),
            Bad("2**63", 2**63),
            Bad("a number as a string", "1"),
            Bad("'nan' as a string", "nan"),
            Bad("a list of a number", [1]),
            Bad("a 5000-digit integer (JSON)", raw="9" * 5000, names=("JSON",)),
        ]
        if spec.low is not None:
            step = 1 if kind == "integer" else 1e-3
            below = spec.low if spec.low_open else spec.low - step
            out.append(Bad(f"{below!r} (below the rule)", below))
            if spec.low >= 0 and below != -1:
                out.append(Bad("-1", -1))
        if spec.high is not None:
            step = 1 if kind == "integer" else 1e-3
            above = spec.high if spec.high_open else spec.high + step
            out.append(Bad(f"{above!r} (above the rule)", above))
        if kind == "integer":
            out += [Bad("1.5", 1.5), Bad("3.0 (a float)", 3.0), Bad("-(2**63)", -(2**63))]
        if kind == "number" and spec.high is None:
            out.append(Bad("1e300 (finite, huge)", 1e300))
        if spec.name == "occurrence":
            out += [Bad("-1000 (no such occurrence)", -1000), Bad("1000 (no such occurrence)", 1000)]
    elif kind == "bool":
        out += [Bad("'yes'", "yes"), Bad("'true'", "true"), Bad("1", 1), Bad("0", 0), Bad("[True]", [True])]
    elif kind == "choice":
        first = spec.choices[0]
        out += [
            Bad("'bogus'", "bogus"),
            Bad("upper case", first.upper()),
            Bad("padded", f" {first} "),
            Bad("1", 1),
            Bad("a list", [first]),
        ]
    elif kind == "words":
        out += [
            Bad("a string, not a list", "cat"),
            Bad("[''] ", [""]),
            Bad("['  ']", ["  "]),
            Bad("[1]", [1]),
            Bad("[None]", [None]),
            Bad("[['cat']]", [["cat"]]),
            Bad("{'cat': 1}", {"cat": 1}),
            Bad("['cat', 5]", ["cat", 5]),
            Bad("[True]", [True]),
            Bad("a word not in the prompt", ["dog"], names=("dog",)),
            Bad("a 10,000-letter word", ["x" * 10_000], names=("x" * 40,)),
            Bad("100,000 empty words", [""] * 100_000),
        ]
    elif kind == "layers":
        out += [
            Bad("[-1]", [-1]),
            Bad("['']", [""]),
            Bad("[True]", [True]),
            Bad("a string, not a list", "up_blocks.1"),
            Bad("[1.5]", [1.5]),
            Bad("[None]", [None]),
            Bad("[[0]]", [[0]]),
            Bad("[10**30]", [10**30]),
            Bad("[2**63]", [2**63]),
            Bad("a layer the model lacks", ["nope"], names=("nope",)),
            Bad("a block index the model lacks", [999], names=("999",)),
            Bad("an unbalanced pattern '('", ["("], names=("(",)),
            Bad("a pattern '*'", ["*"], valid="'*' is a pattern matching every layer"),
            Bad("['  ']", ["  "]),
        ]
    elif kind == "steps":
        out += [
            Bad("[-1]", [-1]),
            Bad("[1.5]", [1.5]),
            Bad("[True]", [True]),
            Bad("a string, not a list", "0"),
            Bad("[None]", [None]),
            Bad("[[0]]", [[0]]),
            Bad("['0']", ["0"]),
            Bad("[10**30]", [10**30]),
            Bad("[2**63]", [2**63]),
            Bad("a step past the run", [999], names=("999",)),
        ]
    elif kind == "regions":
        out += region_values()
    elif kind == "data":
        out += data_values(cls.kind, spec.name)
    return out


def region_values() -> list[Bad]:
    def region(**kw: Any) -> list[dict]:
        return [{"box": [0, 0, 0.5, 1], "prompt": "a cat", **kw}]

    return [
        Bad("[5]", [5]),
        Bad("[None]", [None]),
        Bad("[{}] (no box)", [{}], names=("box",)),
        Bad("a region without prompt or image", [{"box": [0, 0, 1, 1]}], names=("prompt",)),
        Bad("a region with an unknown key", region(bogus=1), names=("bogus",)),
        Bad("box nan", region(box=[math.nan, 0, 1, 1]), names=("box",)),
        Bad(
            "box 1e400 (JSON)",
            raw=json.dumps(region(box="@")).replace('"@"', "[0, 0, 1e400, 1]"),
            names=("box",),
        ),
        Bad("box with a 400-digit integer", region(box=[0, 0, 10**400, 1]), names=("box",)),
        Bad("box of three numbers", region(box=[0, 0, 1]), names=("box",)),
        Bad("box as a string", region(box="0,0,1,1"), names=("box",)),
        Bad("box reversed", region(box=[1, 1, 0, 0]), names=("box",)),
        Bad("box past 1", region(box=[0, 0, 2, 1]), names=("box",)),
        Bad("box of booleans", region(box=[True, 0, 1, 1]), names=("box",)),
        Bad("box of strings", region(box=["0", "0", "1", "1"]), names=("box",)),
        Bad("box None", region(box=None), names=("box",)),
        Bad("an empty prompt", region(prompt=""), names=("prompt",)),
        Bad("a prompt of 5", region(prompt=5), names=("prompt",)),
        Bad("priority 1.5", region(priority=1.5), names=("priority",)),
        Bad("priority 10**30", region(priority=10**30), names=("priority",)),
        Bad("priority '1'", region(priority="1"), names=("priority",)),
        Bad("scale nan", region(scale=math.nan), names=("scale",)),
        Bad("scale -1", region(scale=-1), names=("scale",)),
        Bad("scale inf", region(scale=math.inf), names=("scale",)),
        Bad("scale '1'", region(scale="1"), names=("scale",)),
        Bad("a missing image", region(image="/nowhere/cat.png"), names=("image",)),
        Bad("an image that is a folder", region(image="/tmp"), names=("image",)),
        Bad(
            "an image that is no image (/etc/hostname)",
            region(image="/etc/hostname"),
            names=("image", "regions"),
        ),
        Bad("an image of 5", region(image=5), names=("image",)),
        Bad("an empty image path", region(image=""), names=("image",)),
    ]


def data_values(kind: str, name: str) -> list[Bad]:
    if (kind, name) == ("SoftPAG", "heads"):
        return [
            Bad("a missing result file", "/nowhere/heads.json", names=("/nowhere",)),
            Bad("a folder", "/tmp"),
            Bad("{}", {}),
            Bad("no heads of a layer", {MID: []}),
            Bad("head -1", {MID: [-1]}),
            Bad("head 1.5", {MID: [1.5]}),
            Bad("head True", {MID: [True]}),
            Bad("heads as a string", {MID: "0"}),
            Bad("an empty layer name", {"": [0]}),
            Bad("a head the layer lacks", {MID: [999]}, names=("999",)),
            Bad("a layer the model lacks", {"nope": [0]}, names=("nope",)),
            Bad("a cross-attention layer", {MID.replace("attn1", "attn2"): [0]}, names=("attn2",)),
            Bad("a string without a head", ["nocolon"]),
            Bad("head 'x'", [f"{MID}:x"]),
            Bad("head -1 in a string", [f"{MID}:-1"]),
            Bad("no layer", [":0"]),
            Bad("head '²' (a digit to str.isdigit)", [f"{MID}:²"]),
            Bad(
                "a head index of 20 digits", [f"{MID}:99999999999999999999"], names=("99999999999999999999",)
            ),
            Bad("[5]", [5]),
            Bad("[None]", [None]),
            Bad("[]", []),
            Bad("/proc/self/mem (unreadable)", "/proc/self/mem"),
            Bad("/etc/hostname (not JSON)", "/etc/hostname"),
        ]
    if (kind, name) == ("DraftAttention", "pool"):
        return [
            Bad("[0, 1]", [0, 1]),
            Bad("[1]", [1]),
            Bad("[1, 2, 3]", [1, 2, 3]),
            Bad("[1.5, 2]", [1.5, 2]),
            Bad("[True, 2]", [True, 2]),
            Bad("strings", ["8", "16"]),
            Bad("[-1, 8]", [-1, 8]),
            Bad("[10**30, 8]", [10**30, 8]),
            Bad("[2**40, 8] (a 64-bit integer, far past any video)", [2**40, 8]),
            Bad("[nan, 8]", [math.nan, 8], "[NaN, 8]"),
            Bad("[]", []),
            Bad("{}", {}),
        ]
    if (kind, name) == ("DraftAttention", "dense_blocks"):
        return [
            Bad("[-1]", [-1]),
            Bad("[1.5]", [1.5]),
            Bad("[True]", [True]),
            Bad("['0']", ["0"]),
            Bad("a block the model lacks", [999], names=("999",)),
            Bad("[10**30]", [10**30]),
            Bad("5", 5),
            Bad("[] (no dense block)", [], valid="an empty list is allowed: every block sparse"),
            Bad("{}", {}),
        ]
    if (kind, name) == ("AttendAndExcite", "thresholds"):
        return [
            Bad("a key 'x'", {"x": 0.5}),
            Bad("a key '-1'", {"-1": 0.5}),
            Bad("a threshold 2", {"0": 2}),
            Bad("a threshold -0.1", {"0": -0.1}),
            Bad("a threshold nan", {"0": math.nan}, '{"0": NaN}'),
            Bad("a threshold '0.5'", {"0": "0.5"}),
            Bad("a threshold True", {"0": True}),
            Bad("a key '1.5'", {"1.5": 0.5}),
            Bad("a key '²'", {"²": 0.5}),
            Bad("a key of 20 digits", {"99999999999999999999": 0.5}),
            Bad("a list", [0.5]),
            Bad("a number", 0.5),
            Bad("[]", []),
            Bad("{} (no refinement)", {}, valid="no thresholds: no iterative refinement"),
        ]
    return []


def api_cases(ctx: Context) -> list[Case]:
    import attnctl
    from attnctl.core.controls import _REGISTRY, Control

    cases: list[Case] = []
    for kind, cls in sorted(_REGISTRY.items()):
        if kind not in REQUIRED:
            continue
        family = "wan" if cls.video_only else "sd"
        for spec in cls.fields():
            for bad in field_values(cls, spec):
                names = (f"{spec.name}=", f"{kind}.{spec.name}", *bad.names)
                if bad.py is not MISSING:
                    kw = {**REQUIRED[kind], spec.name: bad.py}
                    cases.append(
                        Case(
                            "api",
                            f"{kind}.{spec.name} (Python)",
                            f"{kind}({spec.name}={_short(repr(bad.py), 80)})",
                            run=lambda cls=cls, kw=kw, family=family: run_controls(ctx, [cls(**kw)], family),
                            names=names,
                            valid=bad.valid,
                        )
                    )
                raw = bad.raw if bad.raw is not None else _json_text(bad.py)
                if raw is None:
                    continue
                base = json.dumps({"kind": kind, **REQUIRED[kind], spec.name: "@@"})
                text = "[" + base.replace('"@@"', raw) + "]"
                cases.append(
                    Case(
                        "api",
                        f"{kind}.{spec.name} (JSON)",
                        _short(text, 160),
                        run=lambda text=text, family=family: run_controls(
                            ctx, Control.list_from_json(text), family
                        ),
                        names=names,
                        valid=bad.valid,
                    )
                )
    cases += _json_cases(ctx)
    cases += _cross_field_cases(ctx)
    cases += _session_cases(ctx, attnctl)
    cases += _generate_cases(ctx, attnctl)
    return cases


def _json_cases(ctx: Context) -> list[Case]:
    from attnctl.core.controls import Control

    texts = [
        ("malformed", "[{"),
        ("a lone brace", "}"),
        ("trailing comma", '[{"kind": "AStar", "concepts": ["cat", "frog"],}]'),
        ("single quotes", "[{'kind': 'AStar'}]"),
        ("null", "null"),
        ("a number", "5"),
        ("a string", '"AStar"'),
        ("NaN at the top", "NaN"),
        ("a list of a number", "[5]"),
        ("a list of null", "[null]"),
        ("a list of lists", "[[]]"),
        ("a list of strings", '["AStar"]'),
        ("kind null", '[{"kind": null}]'),
        ("no kind", '[{"concepts": ["cat"]}]'),
        ("kind 5", '[{"kind": 5}]'),
        ("kind a list", '[{"kind": ["AStar"]}]'),
        ("kind in lower case", '[{"kind": "astar", "concepts": ["cat", "frog"]}]'),
        ("kind the base class", '[{"kind": "Control"}]'),
        ("kind empty", '[{"kind": ""}]'),
        ("an unknown field", '[{"kind": "AStar", "concepts": ["cat", "frog"], "scael": 1}]'),
        ("a field named like a dunder", '[{"kind": "AStar", "concepts": ["cat", "frog"], "__class__": 1}]'),
        ("100,000 nested lists", "[" * 100_000 + "]" * 100_000),
        ("100,000 nested objects", '{"a":' * 100_000 + "1" + "}" * 100_000),
        ("a 5000-digit number at the top", "9" * 5000),
        ("invalid escape", '[{"kind": "AStar\\x"}]'),
        ("a lone surrogate kind", '[{"kind": "\\ud800"}]'),
        ("a NUL in kind", '[{"kind": "AStar\\u0000"}]'),
        ("text after the JSON", "[] trailing"),
        ("two documents", "[] []"),
        ("a 10 MB string kind", '[{"kind": "' + "x" * 10_000_000 + '"}]'),
    ]
    cases = [
        Case(
            "api",
            "controls JSON",
            f"{label}: {_short(text, 80)!r}",
            run=lambda text=text: Control.list_from_json(text),
            names=("JSON", "control", "kind", "field"),
        )
        for label, text in texts
    ]
    dicts = [
        ("a list", ["AStar"]),
        ("a string", "AStar"),
        ("None", None),
        ("5", 5),
        ("no kind", {"concepts": ["cat"]}),
        ("kind None", {"kind": None}),
        ("kind 5", {"kind": 5}),
        ("kind a class", {"kind": object}),
        ("kind unhashable", {"kind": ["AStar"]}),
        ("an unknown field", {"kind": "AStar", "concepts": ["cat", "frog"], "bogus": 1}),
        ("a non-string key", {"kind": "AStar", "concepts": ["cat", "frog"], 5: 1}),
    ]
    cases += [
        Case(
            "api",
            "Control.from_dict",
            f"{label}: {_short(repr(d), 80)}",
            run=lambda d=d: Control.from_dict(d),
            names=("kind", "field", "control", "bogus", "5"),
        )
        for label, d in dicts
    ]
    return cases


def _cross_field_cases(ctx: Context) -> list[Case]:
    import attnctl

    def make(f):
        return lambda: run_controls(ctx, f())

    rows = [
        ("AStar repeated concepts", lambda: [attnctl.AStar(["cat", "Cat"])], ("concepts",)),
        ("AStar one concept", lambda: [attnctl.AStar(["cat"])], ("concepts",), "one concept is allowed"),
        (
            "Layout other_regions with mask_and_sum",
            lambda: [
                attnctl.Layout(
                    [attnctl.Region((0, 0, 0.5, 1), "a cat")],
                    base_outside="other_regions",
                    mode="mask_and_sum",
                )
            ],
            ("base_outside",),
        ),
        (
            "Layout no sub-prompts and words kept",
            lambda: [
                attnctl.Layout(
                    [attnctl.Region((0, 0, 0.5, 1), "a cat")], sub_prompts=False, base_outside="all"
                )
            ],
            ("sub_prompts",),
        ),
        ("SoftPAG top with listed heads", lambda: [attnctl.SoftPAG([f"{MID}:0"], top=1)], ("top",)),
        (
            "SoftPAG and PAG of other scales",
            lambda: [attnctl.SoftPAG([f"{MID}:0"], scale=2.0), attnctl.PAG(["mid_block"], scale=3.0)],
            ("scale",),
        ),
        (
            "two AStar",
            lambda: [attnctl.AStar(["cat", "frog"]), attnctl.AStar(["cat", "frog"])],
            ("AStar",),
            "guidance controls compose, each making its own update",
        ),
        (
            "two Layouts",
            lambda: [attnctl.Layout([attnctl.Region((0, 0, 0.5, 1), "a cat")])] * 2,
            ("two Layout", "one Layout", "Layouts"),
        ),
        ("DraftAttention on an image model", lambda: [attnctl.DraftAttention()], ("DraftAttention",)),
        (
            "a subject image without an IP-Adapter",
            lambda: [attnctl.Layout([attnctl.Region((0, 0, 0.5, 1), image="/etc/hostname")])],
            ("regions", "IP-Adapter"),
        ),
        ("PAG on cross-attention only", lambda: [attnctl.PAG(["attn2"])], ("layers", "attn2")),
        ("AttentionMaps of a word not in the prompt", lambda: [attnctl.AttentionMaps(["dog"])], ("dog",)),
        (
            "AStar occurrence 1 of a word said once",
            lambda: [attnctl.AStar(["cat", "frog"], occurrence=1)],
            ("occurrence",),
        ),
    ]
    return [
        Case(
            "api",
            "cross-field and model",
            row[0],
            run=make(row[1]),
            names=row[2],
            valid=(row[3:] or [None])[0],
        )
        for row in rows
    ]


def _session_cases(ctx: Context, attnctl: Any) -> list[Case]:
    def with_control(pipe_of: Callable[[], Any], *controls: Any) -> Callable[[], Any]:
        def run() -> None:
            with attnctl.control(pipe_of(), *controls):
                pass

        return run

    sd = lambda: ctx.pipe("sd")  # noqa: E731
    rows = [
        ("a string", ("AStar",), (TypeError,)),
        ("a control dict", ({"kind": "AStar", "concepts": ["cat", "frog"]},), (TypeError,)),
        ("None", (None,), (TypeError,)),
        ("5", (5,), (TypeError,)),
        ("a control class", (attnctl.AStar,), (TypeError,)),
        ("a list of controls", ([attnctl.AttentionMaps(["cat"])],), (TypeError,)),
    ]
    cases = [
        Case(
            "api",
            "attnctl.control(pipe, ...)",
            f"control(pipe, {label})",
            run=with_control(sd, *args),
            names=("control(",),
            expect=expect,
        )
        for label, args, expect in rows
    ]
    for label, pipe in (
        ("None", None),
        ("object()", object()),
        ("a model id string", "tiny:sd"),
        ("a UNet", "unet"),
    ):
        cases.append(
            Case(
                "api",
                "attnctl.control(pipe, ...)",
                f"control({label}, AttentionMaps(['cat']))",
                run=with_control(
                    (lambda: ctx.pipe("sd").unet) if pipe == "unet" else (lambda pipe=pipe: pipe),
                    attnctl.AttentionMaps(["cat"]),
                ),
                names=("denoiser", "pipeline"),
            )
        )
    return cases


def _generate_cases(ctx: Context, attnctl: Any) -> list[Case]:
    def gen(**kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            args = {"prompt": PROMPT, "controls": [], "seed": 0, "steps": 1, "height": 32, "width": 32, **kw}
            latents = []

            def keep(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
                latents.append(tensors["latents"].detach().float().numpy())
                return tensors

            attnctl.generate(
                ctx.pipe("sd"), args.pop("prompt"), args.pop("controls"), **args, callback_on_step_end=keep
            )
            return latents[-1] if latents else None  # NaN latents: a NaN image

        return run

    rows: list[tuple[str, dict, tuple[str, ...], str | None]] = []
    for name, values in {
        "seed": [-1, 1.5, "0", True, math.nan, 2**64, 10**30, -(2**63)],
        "steps": [0, -1, 1.5, "2", True, math.nan, 10**30, 2**63],
        "height": [0, -8, 33, 1.5, "32", True, math.nan, math.inf, 10**30, 2**62],
        "width": [0, -8, 33, 1.5, "32", True, math.nan, 10**30],
        "prompt": ["", "   ", None, 5, ["a cat", ""], [], ("a cat",)],
        "controls": ["AStar", [5], [{"kind": "Nope"}], [None], 5],
        "guidance_scale": [math.nan, math.inf, -math.inf],
    }.items():
        for v in values:
            names = (f"{name}=", name, repr(v)) if name != "controls" else ("control", "kind")
            rows.append((f"generate({name}={_short(repr(v), 40)})", {name: v}, names, None))
    return [
        Case("api", "attnctl.generate", label, run=gen(**kw), names=names, valid=valid)
        for label, kw, names, valid in rows
    ]


# ---- the command -----------------------------------------------------------------------------------
def cli_cases(ctx: Context) -> list[Case]:
    d = ctx.dir
    a_file = ctx.file("a-file", "")
    not_utf8 = ctx.file("not-utf8.txt", b"\xff\xfe a cat\n")
    empty = ctx.file("empty.txt", "")
    blank = ctx.file("blank.txt", "  \n\n \t\n")
    binary = ctx.file("binary.bin", bytes(range(256)) * 4)
    good_prompts = ctx.file("prompts.txt", "a red circle\na blue square\n")
    folder = ctx.folder("a-folder")
    empty_model = ctx.folder("empty-model")
    bad_controls = {
        "missing": str(d / "nowhere.json"),
        "a folder": folder,
        "not UTF-8": ctx.file("controls-latin1.json", b"[\xff]"),
        "malformed": ctx.file("controls-bad.json", "[{"),
        "empty": empty,
        "a bad field": ctx.file(
            "controls-scale.json", '[{"kind": "AStar", "concepts": ["red", "blue"], "scale": -1}]'
        ),
        "Infinity": ctx.file(
            "controls-inf.json", '[{"kind": "AStar", "concepts": ["red", "blue"], "scale": Infinity}]'
        ),
        "an unknown kind": ctx.file("controls-kind.json", '[{"kind": "Nope"}]'),
        "deeply nested": ctx.file("controls-deep.json", "[" * 100_000 + "]" * 100_000),
        "a region without a box": ctx.file(
            "controls-region.json", '[{"kind": "Layout", "regions": [{"prompt": "a"}]}]'
        ),
        "a region box of a 400-digit integer": ctx.file(
            "controls-box.json",
            '[{"kind": "Layout", "regions": [{"box": [0, 0, 1' + "0" * 400 + ', 1], "prompt": "a"}]}]',
        ),
        "a word not in the prompt": ctx.file(
            "controls-word.json", '[{"kind": "AttentionMaps", "tokens": ["dog"]}]'
        ),
        "heads at /proc/self/mem": ctx.file(
            "controls-heads.json", '[{"kind": "SoftPAG", "heads": "/proc/self/mem"}]'
        ),
        "/proc/self/mem itself": "/proc/self/mem",
        "/dev/null": "/dev/null",
    }
    control_names = {
        "missing": ("nowhere.json",),
        "a folder": ("a-folder",),
        "a word not in the prompt": ("dog",),
        "/proc/self/mem itself": ("/proc/self/mem",),
        "/dev/null": ("/dev/null",),
    }
    fast = ["--steps", "1", "--threads", "1"]  # when a case gets as far as the model: the testbed, 1 step
    out = str(d / "out")
    cases: list[Case] = []

    def add(
        group: str,
        argv: list[str],
        names: tuple[str, ...],
        valid: str | None = None,
        timeout: float | None = None,
    ):
        cases.append(
            Case(
                "cli",
                group,
                " ".join(_shell(a) for a in argv),
                argv=argv,
                names=names,
                valid=valid,
                timeout=timeout,
            )
        )

    # generate: every flag with bad values
    gen = ["generate", TESTBED_PROMPT, "--out", out]
    for flag, values in {
        "--steps": ["0", "-1", "1e400", "nan", "abc", "", "1.5", str(10**30), str(2**63), str(2**62)],
        "--seed": ["-1", "abc", "1.5", "nan", str(2**64), str(10**30), str(-(2**63))],
        "--height": ["0", "-8", "33", "abc", "nan", "1.5", str(10**30), str(2**63)],
        "--width": ["0", "-8", "33", "abc", str(10**30)],
        "--guidance": ["-1", "nan", "inf", "-inf", "1e400", "abc", ""],
        "--threads": ["0", "-1", "abc", str(2**31), str(10**30)],
        "--maps": ["", ",", " , ", "dog", "red,,dog", "red\udcff"],
        "--region": [
            "",
            "0,0,1",
            "a,b,c,d:x",
            "0,0,1,1:",
            "0,0,1,1",
            "nan,0,1,1:a red circle",
            "0,0,inf,1:a red circle",
            "1,1,0,0:a red circle",
            "0,0,1e400,1:a red circle",
            "0,0,2,1:a red circle",
            "0,0,1,1:  ",
        ],
    }.items():
        for value in values:
            extra = [] if flag in ("--steps", "--threads") else fast
            if flag == "--steps":
                extra = ["--threads", "1"]
            if flag == "--threads":
                extra = ["--steps", "1"]
            names = (flag, flag.lstrip("-") + "=", value) if value.strip() else (flag, flag.lstrip("-") + "=")
            add("generate " + flag, [*gen, flag, value, *extra], names)
    for label, path in bad_controls.items():
        add(
            "generate --controls",
            [*gen, "--controls", path, *fast],
            ("--controls", "controls", *control_names.get(label, (Path(path).name,))),
            valid=NO_CONTROLS if label in ("empty", "/dev/null") else None,
        )
    for _label, path in (
        ("missing", str(d / "nowhere.txt")),
        ("a folder", folder),
        ("not UTF-8", not_utf8),
        ("empty", empty),
        ("blank lines only", blank),
        ("binary", binary),
        ("/dev/null", "/dev/null"),
        ("/proc/self/mem", "/proc/self/mem"),
    ):
        add(
            "generate --prompts",
            ["generate", "--prompts", path, "--out", out, *fast],
            ("--prompts", "prompts", Path(path).name),
        )
    add(
        "generate --prompts",
        ["generate", "a cat", "--prompts", good_prompts, "--out", out, *fast],
        ("PROMPT", "--prompts"),
    )
    add("generate --prompts", ["generate", "--out", out, *fast], ("PROMPT", "--prompts"))
    for _label, path in (
        ("/proc", "/proc/attnctl-out"),
        ("a file", a_file),
        ("under a file", str(Path(a_file) / "out")),
        ("deep under a file", str(Path(a_file) / "x" / "y")),
        ("a device", ctx.device()),
        ("/dev/null/x", "/dev/null/x"),
        ("/sys", "/sys/attnctl-out"),
        ("an empty path", ""),
    ):
        add(
            "generate --out",
            ["generate", TESTBED_PROMPT, "--out", path, *fast],
            ("--out", path or "''"),
            valid="an empty path is the current folder" if path == "" else None,
        )
    for _label, model in (
        ("tiny:nope", "tiny:nope"),
        ("tiny:", "tiny:"),
        ("a missing folder", "/nowhere/model"),
        ("a relative missing folder", "./nowhere"),
        ("too many slashes", "a/b/c"),
        ("a hub id (offline)", "nobody/nothing"),
        ("an empty folder", empty_model),
        ("a file", a_file),
        ("an empty string", ""),
        ("a space", " "),
        ("a backslash", "a\\b"),
        ("/dev/null", "/dev/null"),
        ("~ missing", "~/nowhere-model"),
    ):
        add(
            "generate --model",
            ["generate", TESTBED_PROMPT, "--model", model, "--out", out, *fast],
            ("--model", "model", model.strip() or "''"),
        )
    for _label, prompt in (
        ("empty", ""),
        ("blank", "   "),
        ("a NUL", "a\x00cat"),
        ("undecodable bytes", "a \udcff cat"),
    ):
        nul = "a NUL is a character of the prompt's text" if "\x00" in prompt else None
        add("generate PROMPT", ["generate", prompt, "--out", out, *fast], ("prompt",), valid=nul)
    add("generate", ["generate", "a", "b", "--out", out], ("argument", "'b'"))
    add("generate", ["generate", TESTBED_PROMPT, "--bogus"], ("--bogus",))
    add("generate", ["generate", TESTBED_PROMPT, "--steps"], ("--steps",))

    # bench: compose, maps, layout (testbed benchmarks), draft, pag
    small = ["--prompts", "1", "--seeds", "1", "--steps", "1", "--threads", "1", "--quiet"]
    for command in ("compose", "maps", "layout"):
        sizes = "2" if command != "compose" else "1"
        base = ["bench", command, "--sizes", sizes, *small]
        for flag, values in {
            "--sizes": ["0", "-1", "9", "abc", "", ",", str(10**30)],
            "--prompts": ["0", "-1", "abc", str(2**63)],
            "--seeds": ["0", "abc", str(2**63)],
            "--steps": ["0", "abc", str(10**30)],
            "--guidance": ["-1", "nan", "inf"],
            "--threads": ["0", str(2**31)],
            "--json": [folder, a_file + "/x.json", "/proc/x.json", "/dev/null/x.json"],
            "--model": ["tiny:sd", "/nowhere", empty_model, a_file],
        }.items():
            for value in values:
                add(
                    f"bench {command} {flag}",
                    [*base, flag, value],
                    (flag, value) if value.strip(",") else (flag,),
                )
        if command != "maps":
            for value in ("bogus", ",", "", "none,bogus"):
                add(f"bench {command} --method", [*base, "--method", value], ("--method", "method", "bogus"))
    add(
        "bench compose --method",
        ["bench", "compose", "--method", "softpag:/nowhere.json", "--sizes", "1", *small],
        ("/nowhere.json",),
    )
    add(
        "bench compose --method",
        ["bench", "compose", "--method", f"softpag:{not_utf8}", "--sizes", "1", *small],
        ("not-utf8",),
    )
    draft = [
        "bench",
        "draft",
        "--json",
        str(d / "draft.json"),
        "--no-e2e",
        "--tokens",
        "2048",
        "--sparsity",
        "0.5",
        "--heads",
        "1",
        "--head-dim",
        "8",
        "--repeats",
        "1",
        "--backend",
        "gather",
        "--threads",
        "1",
    ]
    for flag, values in {
        "--tokens": ["0", "-2048", "100", "abc", ",", str(10**30)],
        "--sparsity": ["nan", "inf", "-0.1", "1", "abc", "1e400"],
        "--heads": ["0", "abc", str(10**30)],
        "--head-dim": ["0", str(2**63)],
        "--repeats": ["0", str(10**30)],
        "--backend": ["bogus", ",", "flex,bogus"],
        "--json": [folder, "/proc/x.json", a_file + "/x.json"],
        "--e2e-size": ["17", "0", str(10**30)],
        "--e2e-frames": ["0", str(10**30)],
        "--e2e-steps": ["0"],
        "--e2e-layers": ["0"],
    }.items():
        for value in values:
            argv = _with(draft, flag, value)  # --tokens, --sparsity, --backend repeat: replace the value
            if flag.startswith("--e2e"):
                argv = [a for a in argv if a != "--no-e2e"] + ["--no-kernel"]
            add(
                f"bench draft {flag}",
                argv,
                (flag, flag.lstrip("-").replace("-", "_") + "=", value) if value.strip(",") else (flag,),
            )
    add("bench draft --json", ["bench", "draft", "--no-e2e"], ("--json",))
    pag = ["bench", "pag", "--models", "testbed", "--samples", "1", "--threads", "1"]
    for flag, values in {
        "--models": ["bogus", ",", "", "testbed,bogus"],
        "--samples": ["0", "abc", str(10**30)],
        "--batch": ["bogus", ""],
        "--json": [folder, "/proc/x.json"],
        "--threads": ["0", str(2**31)],
    }.items():
        for value in values:
            add(
                f"bench pag {flag}",
                [*pag, flag, value],
                (flag, flag.lstrip("-"), value) if value.strip(",") else (flag, flag.lstrip("-")),
            )

    # headhunter
    hh_out = str(d / "heads.json")
    hh = [
        "headhunter",
        "--no-resume",
        "--layers",
        MID,
        "--samples",
        "1",
        "--rounds",
        "1",
        "--top-k",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--threads",
        "1",
        "--out",
        hh_out,
    ]
    for flag, values in {
        "--samples": ["0", "-1", "abc", str(10**30)],
        "--rounds": ["0", "abc", str(10**30)],
        "--top-k": ["0", "5", str(10**30)],
        "--steps": ["0", "abc", str(10**30)],
        "--batch-size": ["0", str(10**30)],
        "--guidance": ["-1", "nan", "inf"],
        "--u": ["nan", "inf", "-1", "2", "abc"],
        "--scale": ["nan", "inf", "-1", "1e400"],
        "--layers": ["nope", "", ",", "-1", "99999", "(", "*", MID.replace("attn1", "attn2")],
        "--objective": ["bogus", "", "clip:", "clip:/nowhere", f"clip:{folder}", "CLIP:x"],
        "--out": [folder, "/proc/x.json", a_file + "/x.json", ctx.device()],
        "--prompts": [not_utf8, empty, str(d / "nowhere.txt"), ctx.file("cat.txt", "a cat\n")],
        "--threads": ["0", str(2**31)],
        "--model": ["tiny:nope", "/nowhere"],
    }.items():
        for value in values:
            argv = [*hh, flag, value]
            add(
                f"headhunter {flag}",
                argv,
                (flag, flag.lstrip("-").replace("-", "_") + "=", value)
                if value.strip(",")
                else (flag, flag.lstrip("-")),
                valid="'*' is a pattern matching every layer" if (flag, value) == ("--layers", "*") else None,
            )
    # a damaged result at --out (resumed): one error naming it before any generation
    for label, text in damaged_results_for_cli():
        path = ctx.file(f"hh-{label.replace(' ', '-')}.json", text)
        argv = [a for a in hh[:-1] if a != "--no-resume"]
        add("headhunter --out (damaged)", [*argv, path], ("--out", "out=", Path(path).name))

    # layers
    for _label, argv in (
        ("missing MODEL", ["layers", "/nowhere"]),
        ("tiny:nope", ["layers", "tiny:nope"]),
        ("a file", ["layers", a_file]),
        ("an empty folder", ["layers", empty_model]),
        ("--height 33", ["layers", "--height", "33"]),
        ("--height 0", ["layers", "--height", "0"]),
        ("--height -8", ["layers", "--height", "-8"]),
        ("--height 10**30", ["layers", "--height", str(10**30)]),
        ("--height nan", ["layers", "--height", "nan"]),
        ("--width 2**63", ["layers", "--width", str(2**63)]),
        ("two models", ["layers", "a", "b"]),
    ):
        add("layers", argv, ("MODEL", "--height", "--width", argv[-1]))

    # testbed
    train = ["testbed", "train", "--smoke", "--threads", "1", "--out", str(d / "train")]
    for flag, values in {
        "--seed": ["-1", "abc", str(10**30)],
        "--vae-steps": ["0", str(10**30)],
        "--unet-steps": ["0", str(10**30)],
        "--ground-weight": ["-1", "nan", "inf"],
        "--threads": ["0", str(2**31)],
        "--out": [a_file, "/proc/train", a_file + "/x"],
    }.items():
        for value in values:
            add(f"testbed train {flag}", [*train, flag, value], (flag, value))
    for flag, values in {
        "--n": ["0", "-1", "abc", str(10**30)],
        "--seed": ["-1", "abc", str(10**30)],
    }.items():
        for value in values:
            add(
                f"testbed eval-detector {flag}",
                ["testbed", "eval-detector", "--n", "1", flag, value],
                (flag, value),
            )

    # families, top level
    add("families", ["families", "--bogus"], ("--bogus",))
    add("families", ["families", "extra"], ("extra",))
    add("top level", ["bogus"], ("bogus",))
    add("top level", ["--bogus"], ("--bogus",))
    add(
        "top level",
        ["generate", "--help", "--bogus"],
        ("--bogus",),
        valid="--help is eager: the help is printed",
    )

    # ui: a bad value must be refused before the server starts
    for flag, values in {
        "--port": ["0", "65536", "-1", "abc", str(10**30)],
        "--host": ["999.999.1.1", "no such host.invalid", ""],
        "--max-pixels": ["0", "-1", "abc", str(10**30)],
        "--max-steps": ["0", str(10**30)],
        "--max-frames": ["0"],
        "--max-iterations": ["0", "nan"],
        "--max-seconds": ["0", "nan", "inf", "-1"],
        "--threads": ["0", str(2**31)],
        "--model": ["tiny:nope", "/nowhere"],
    }.items():
        for value in values:
            add(
                f"ui {flag}",
                ["ui", flag, value, "--port", "17861"] if flag != "--port" else ["ui", flag, value],
                (flag, value) if value else (flag,),
                valid="an empty --host is Gradio's default, loopback"
                if (flag, value) == ("--host", "")
                else None,
                timeout=60,
            )
    for label, path in bad_controls.items():
        if label in ("a word not in the prompt",):
            continue
        add(
            "ui --controls",
            ["ui", "--controls", path, "--port", "17861"],
            ("--controls", "controls", *control_names.get(label, (Path(path).name,))),
            valid=NO_CONTROLS if label in ("empty", "/dev/null") else None,
            timeout=60,
        )
    return cases


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag` given `value`: in place of its value where it is there, else added."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[: i + 1], value, *argv[i + 2 :]]
    return [*argv, flag, value]


def damaged_results_for_cli() -> list[tuple[str, str]]:
    return [
        ("not JSON", "{"),
        ("a list", "[]"),
        ("no settings", json.dumps({"format": "attnctl.headhunter/1", "objective": "testbed"})),
        (
            "settings null",
            json.dumps({"format": "attnctl.headhunter/1", "objective": "testbed", "settings": None}),
        ),
        ("no objective", json.dumps({"format": "attnctl.headhunter/1", "settings": {}})),
    ]


def _shell(arg: str) -> str:
    import shlex

    return shlex.quote(arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")) if arg else "''"


# ---- the web demo ----------------------------------------------------------------------------------
def demo_cases(ctx: Context) -> list[Case]:
    from attnctl.ui import build_app
    from attnctl.ui.app import Limits, _controls_from_widgets

    limits = Limits(max_seconds=ctx.timeout)
    app = build_app(ctx.pipe("testbed"), steps=2, limits=limits)
    run = next(f.fn for f in app.fns.values() if f.api_name == "generate")
    panels = app.attnctl_panels
    cases: list[Case] = []

    def request(
        prompt=TESTBED_PROMPT, controls="[]", seed=0, steps=1, height=None, width=None, baseline=False
    ):
        return lambda: run(prompt, controls, seed, steps, height, width, baseline)

    import gradio as gr

    def add(group, label, names, valid=None, **kw):
        cases.append(
            Case("demo", group, label, run=request(**kw), names=names, valid=valid, expect=(gr.Error,))
        )

    for v in (-1, 1.5, "0", "abc", None, True, math.nan, math.inf, 2**64, 10**30, -(10**30), [], {}):
        add("seed", f"seed={_short(repr(v), 40)}", ("seed",), seed=v)
    for v in (0, -1, 1.5, "2", None, True, math.nan, math.inf, 101, 10**6, 10**30, 2**63):
        add("steps", f"steps={repr(v)}", ("steps",), steps=v)
    for name in ("height", "width"):
        for v in (0, -8, 33, 1.5, "32", True, math.nan, math.inf, 10**5, 10**30, -(10**30), [], "abc"):
            add(name, f"{name}={repr(v)}", (name, "pixels"), **{name: v})
    add("height", "height x width over the server's pixels", ("pixels",), height=2048, width=2048)
    add("height", "height=-32, width=-32 (a positive product)", ("height", "width"), height=-32, width=-32)
    for v in ("", "   ", None, 5):
        add("prompt", f"prompt={repr(v)}", ("prompt",), prompt=v)
    add(
        "prompt",
        "prompt=['a']",
        ("prompt",),
        prompt=["a"],
        valid="a list of prompts: a batch, as generate takes",
    )
    add("prompt", "prompt='\\x00'", ("prompt",), prompt="\x00", valid="any non-empty text is a prompt")

    def ctl(**kw: Any) -> str:
        return json.dumps([kw], allow_nan=True)

    controls = [
        ("malformed JSON", "[{", ("JSON",)),
        ("not a list", '"AStar"', ("controls",)),
        ("null", "null", ("controls",)),
        ("a number", "5", ("controls",)),
        ("[5]", "[5]", ("control",)),
        ("an unknown kind", '[{"kind": "Nope"}]', ("Nope",)),
        ("scale Infinity", ctl(kind="AStar", concepts=["red", "blue"], scale=math.inf), ("scale",)),
        ("scale 1e400", '[{"kind": "AStar", "concepts": ["red", "blue"], "scale": 1e400}]', ("scale",)),
        ("scale NaN", ctl(kind="AStar", concepts=["red", "blue"], scale=math.nan), ("scale",)),
        ("100,000 nested lists", "[" * 100_000 + "]" * 100_000, ("JSON",)),
        (
            "a 5000-digit number",
            '[{"kind": "AStar", "concepts": ["red", "blue"], "scale": ' + "9" * 5000 + "}]",
            ("scale", "JSON"),
        ),
        (
            "AttentionRegulation iterations 51",
            ctl(kind="AttentionRegulation", targets=["red"], iterations=51),
            ("iterations",),
        ),
        (
            "AttentionRegulation iterations 10**30",
            ctl(kind="AttentionRegulation", targets=["red"], iterations=10**30),
            ("iterations",),
        ),
        (
            "AStar iterations 1000",
            ctl(kind="AStar", concepts=["red", "blue"], iterations=1000),
            ("iterations",),
        ),
        (
            "AttendAndExcite max_refinement 51",
            ctl(kind="AttendAndExcite", tokens=["red"], max_refinement=51),
            ("max_refinement",),
        ),
        (
            "AStar iterations 50.0 (a float)",
            ctl(kind="AStar", concepts=["red", "blue"], iterations=50.0),
            ("iterations",),
        ),
        ("SoftPAG heads /etc/passwd", ctl(kind="SoftPAG", heads="/etc/passwd"), ("heads",)),
        ("SoftPAG heads a relative path", ctl(kind="SoftPAG", heads="../heads.json"), ("heads",)),
        ("SoftPAG heads ~", ctl(kind="SoftPAG", heads="~/heads.json"), ("heads",)),
        ("SoftPAG heads /proc/self/mem", ctl(kind="SoftPAG", heads="/proc/self/mem"), ("heads",)),
        ("SoftPAG heads [path]", ctl(kind="SoftPAG", heads=["/etc/passwd"]), ("heads",)),
        ("SoftPAG top with heads a path", ctl(kind="SoftPAG", heads="/etc/passwd", top=1), ("heads", "top")),
        (
            "Layout image /etc/passwd",
            ctl(kind="Layout", regions=[{"box": [0, 0, 1, 1], "prompt": "a", "image": "/etc/passwd"}]),
            ("image",),
        ),
        (
            "Layout image ''",
            ctl(kind="Layout", regions=[{"box": [0, 0, 1, 1], "prompt": "a", "image": ""}]),
            ("image",),
        ),
        (
            "Layout image 5",
            ctl(kind="Layout", regions=[{"box": [0, 0, 1, 1], "prompt": "a", "image": 5}]),
            ("image",),
        ),
        (
            "Layout a region with a 400-digit box",
            '[{"kind": "Layout", "regions": [{"box": [0, 0, 1' + "0" * 400 + ', 1], "prompt": "a"}]}]',
            ("box",),
        ),
        ("Layout a region without a box", ctl(kind="Layout", regions=[{"prompt": "a"}]), ("box",)),
        ("Layout regions 'x'", ctl(kind="Layout", regions="x"), ("regions",)),
        ("Layout regions [null]", ctl(kind="Layout", regions=[None]), ("regions",)),
        ("DraftAttention on an image model", ctl(kind="DraftAttention"), ("DraftAttention",)),
        ("AttentionMaps a word not in the prompt", ctl(kind="AttentionMaps", tokens=["dog"]), ("dog",)),
        (
            "AttentionMaps steps past the run",
            ctl(kind="AttentionMaps", tokens=["red"], steps=[999]),
            ("steps",),
        ),
        ("a layer the model lacks", ctl(kind="PAG", layers=["nope"]), ("nope",)),
        ("a pattern '('", ctl(kind="PAG", layers=["("]), ("(", "layers")),
        (
            "20 AStar controls of 50 iterations",
            json.dumps([{"kind": "AStar", "concepts": ["red", "blue"], "iterations": 50}] * 20),
            ("AStar",),
        ),
        (
            "50 AttentionMaps",
            json.dumps([{"kind": "AttentionMaps", "tokens": ["red"]}] * 50),
            ("AttentionMaps",),
        ),
        (
            "SoftPAG and PAG of other scales",
            json.dumps(
                [
                    {
                        "kind": "SoftPAG",
                        "heads": ["mid_block.attentions.0.transformer_blocks.0.attn1:0"],
                        "scale": 2.0,
                    },
                    {"kind": "PAG", "layers": ["mid_block"]},
                ]
            ),
            ("scale",),
        ),
        ("a 10 MB controls text", '[{"kind": "' + "x" * 10_000_000 + '"}]', ("kind",)),
    ]
    for label, text, names in controls:
        add("controls", label, names, controls=text)
    cases += _widget_cases(panels, _controls_from_widgets, run, gr.Error)
    return cases


def _widget_cases(
    panels: list[Any], controls_from_widgets: Callable, request: Callable, error: type
) -> list[Case]:
    """The panels' Generate path: one panel enabled with a value typed into one widget; the
    panels' controls JSON then goes to the `generate` endpoint, as the button does."""
    from attnctl.core.controls import _REGISTRY

    cases = []
    defaults: dict[str, dict] = {
        "AttentionRegulation": {"targets": ["red"]},
        "AttendAndExcite": {"tokens": ["red"]},
        "AStar": {"concepts": ["red", "blue"]},
        "SoftPAG": {"heads": json.dumps([f"{MID}:0"])},
        "PAG": {"layers": "mid_block"},
        "Layout": {"regions": [[0, 0, 0.5, 1, "a red circle", "", 0, 1.0]]},
    }
    typed = {
        "number": [None, math.nan, math.inf, -math.inf, "abc", 1e300],
        "integer": [None, math.nan, math.inf, 1.5, 10**30],
        "layers": ["a,,b", "-1", "1.5", " , ", "(", "99999"],
        "steps": ["x", "-1", "1.5", " , ", "99999999999999999999999"],
        "words": [[""], ["  "]],
        "data": ["[1,", "null", "1e400", "NaN", '"/etc/passwd"', '"/proc/self/mem"', "{}", "[" * 100_000],
        "regions": [
            [["a", 0, 1, 1, "a red circle", "", 0, 1.0]],
            [[0, 0, 1, 1, "", "", 0, 1.0]],
            [[0, 0, 1, 1, "a red circle", "", "x", 1.0]],
            [[0, 0, 1, 1, "a red circle", "", 0, "nan"]],
            [[1, 1, 0, 0, "a red circle", "", 0, 1.0]],
            [[0, 0, 1, 1, "a red circle", "/etc/passwd", 0, 1.0]],
            [[0, 0, 1, 1, "a red circle", "", 1e30, 1.0]],
            [[0, 0, 1, 1, "a red circle", "", "inf", 1.0]],
        ],
        "choice": ["bogus", None],
        "bool": [None],
    }
    for index, panel in enumerate(panels):
        kind = panel.cls.kind
        cls = _REGISTRY[kind]
        for spec in cls.fields():
            for value in typed.get(spec.kind, []):
                values: list[Any] = []
                for i, p in enumerate(panels):
                    values.append(i == index)
                    for s in p.specs():
                        from attnctl.ui.app import to_widget

                        w = defaults.get(p.cls.kind, {}).get(s.name, to_widget(s, s.default))
                        values.append(value if (i == index and s.name == spec.name) else w)

                def run(values=values):
                    text = json.dumps(controls_from_widgets(panels, values))
                    return request(TESTBED_PROMPT, text, 0, 1, None, None, False)

                shown = _short(repr(value), 60)
                valid = None
                if spec.kind == "integer" and value is None and spec.optional:
                    valid = "an empty optional field is None"
                if spec.kind == "words" and spec.optional:
                    valid = "an empty word picker of an optional field is None"
                if spec.kind == "data" and value == "{}" and spec.name == "thresholds":
                    valid = "no thresholds: no iterative refinement"
                names = (spec.name, kind)
                if spec.kind == "regions":
                    names += ("box", "priority", "scale", "prompt", "image")
                cases.append(
                    Case(
                        "demo",
                        f"panel {kind}.{spec.name}",
                        f"{kind}.{spec.name} typed as {shown}",
                        run=run,
                        names=names,
                        valid=valid,
                        expect=(ValueError, error),
                    )
                )
    return cases


# ---- the head search -------------------------------------------------------------------------------
class Known:
    """A scorer with a known greedy answer (tests/test_headhunter.py's)."""

    worth = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0, "e": 0.5}

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, heads: list[str]) -> list[float]:
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        total = sum(self.worth[h] for h in heads if not (h == "b" and "a" in heads))
        return [total - 0.25, total + 0.25]


def _greedy(score: Any, out: Any) -> dict:
    from attnctl.headhunter import greedy

    return greedy(
        list(Known.worth),
        score,
        rounds=3,
        top_k=1,
        settings={"samples": 2},
        objective="known",
        out=out,
        progress=False,
    )


def headhunter_cases(ctx: Context) -> list[Case]:
    cases: list[Case] = []
    finished_path = ctx.dir / "hh-finished.json"
    _greedy(Known(), finished_path)
    finished = json.loads(finished_path.read_text())
    partial_path = ctx.dir / "hh-partial.json"
    with contextlib.suppress(KeyboardInterrupt):
        _greedy(Known(fail_after=7), partial_path)  # stopped in round 2
    partial = json.loads(partial_path.read_text())
    for base_label, base in (("finished", finished), ("interrupted", partial)):
        for label, damage in result_damages(base_label == "interrupted"):
            valid = "'finished' is not read on resume: the search sets it" if "'finished'" in label else None
            data = json.loads(json.dumps(base))
            try:
                text = damage(data)
            except (KeyError, IndexError, TypeError):
                continue  # this damage does not apply to this result
            text = text if isinstance(text, (str, bytes)) else json.dumps(data, allow_nan=True)
            path = ctx.file(f"result-{base_label}-{len(cases)}.json", text)

            def resume(path=path):
                _greedy(Known(), path)

            cases.append(
                Case(
                    "headhunter",
                    f"resume a {base_label} result",
                    label,
                    run=resume,
                    names=("out=",),
                    valid=valid,
                )
            )
    cases += _softpag_file_cases(ctx)
    cases += _search_cases(ctx)
    return cases


def result_damages(interrupted: bool) -> list[tuple[str, Callable[[dict], Any]]]:
    r = 1 if interrupted else 0  # the round damaged: the one in progress, or the first

    def set_(path: list, value: Any) -> Callable[[dict], None]:
        def damage(data: dict) -> None:
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value

        return damage

    def pop(path: list) -> Callable[[dict], None]:
        def damage(data: dict) -> None:
            target = data
            for key in path[:-1]:
                target = target[key]
            target.pop(path[-1])

        return damage

    rows: list[tuple[str, Callable[[dict], Any]]] = [
        ("an empty file", lambda d: ""),
        ("not JSON", lambda d: "{"),
        ("not UTF-8", lambda d: b"\xff\xfe{}"),
        ("a JSON list", lambda d: "[]"),
        ("JSON null", lambda d: "null"),
        ("a JSON string", lambda d: '"x"'),
        ("an empty object", lambda d: "{}"),
        ("100,000 nested lists", lambda d: "[" * 100_000 + "]" * 100_000),
    ]
    for key in ("format", "objective", "settings", "selected", "finished", "rounds", "timing"):
        rows.append((f"no '{key}'", pop([key])))
        for label, value in (
            ("null", None),
            ("a list", []),
            ("a number", 5),
            ("a string", "x"),
            ("an object", {}),
        ):
            rows.append((f"'{key}' {label}", set_([key], value)))
    rows += [
        ("settings without candidates", pop(["settings", "candidates"])),
        ("settings rounds a string", set_(["settings", "rounds"], "3")),
        ("round entry null", set_(["rounds", r], None)),
        ("round entry a list", set_(["rounds", r], [])),
        ("round without scores", pop(["rounds", r, "scores"])),
        ("round without sample_scores", pop(["rounds", r, "sample_scores"])),
        ("round without picked", pop(["rounds", r, "picked"])),
        ("round without base", pop(["rounds", r, "base"])),
        ("scores null", set_(["rounds", r, "scores"], None)),
        ("scores a list", set_(["rounds", r, "scores"], [])),
        ("a score NaN", set_(["rounds", r, "scores", "e"], math.nan)),
        ("a score Infinity", set_(["rounds", r, "scores", "e"], math.inf)),
        ("a score -Infinity", set_(["rounds", r, "scores", "e"], -math.inf)),
        ("a score a string", set_(["rounds", r, "scores", "e"], "high")),
        ("a score true", set_(["rounds", r, "scores", "e"], True)),
        ("a score null", set_(["rounds", r, "scores", "e"], None)),
        ("a score of a head that is no candidate", set_(["rounds", r, "scores", "z"], 1.0)),
        ("sample_scores null", set_(["rounds", r, "sample_scores"], None)),
        ("sample scores a number", set_(["rounds", r, "sample_scores", "e"], 5)),
        ("sample scores a string", set_(["rounds", r, "sample_scores", "e"], "x")),
        ("sample scores null", set_(["rounds", r, "sample_scores", "e"], None)),
        ("sample scores empty", set_(["rounds", r, "sample_scores", "e"], [])),
        ("sample scores of strings", set_(["rounds", r, "sample_scores", "e"], ["x", "y"])),
        ("sample scores NaN", set_(["rounds", r, "sample_scores", "e"], [math.nan, math.nan])),
        (
            "sample scores of a head that is no candidate",
            set_(["rounds", r, "sample_scores", "z"], [1.0, 1.0]),
        ),
        ("picked a string", set_(["rounds", 0, "picked"], "a")),
        ("picked a number", set_(["rounds", 0, "picked"], 5)),
        ("picked a head that is no candidate", set_(["rounds", 0, "picked"], ["z"])),
        (
            "picked two heads (top_k 1)",
            lambda d: (
                d["rounds"][0].update(picked=["a", "b"]),
                d.update(selected=["a", "b", *d["selected"][1:]]),
            ),
        ),
        (
            "picked no head",
            lambda d: (d["rounds"][0].update(picked=[]), d.update(selected=d["selected"][1:])),
        ),
        (
            "picked a head picked before",
            lambda d: (
                (d["rounds"][1].update(picked=["a"]), d.update(selected=["a", "a", *d["selected"][2:]]))
                if d["rounds"][1]["picked"]
                else (_ for _ in ()).throw(KeyError)
            ),
        ),
        ("selected not the picks", set_(["selected"], ["b"])),
        ("selected with a head that is no candidate", lambda d: d["selected"].append("z")),
        (
            "a fourth round (settings: 3)",
            lambda d: (
                d["rounds"].append({"base": [], "scores": {}, "sample_scores": {}, "picked": ["e"]}),
                d["timing"]["rounds"].append({}),
                d["selected"].append("e"),
            ),
        ),
        ("timing without rounds", pop(["timing", "rounds"])),
        ("timing rounds one short", lambda d: d["timing"]["rounds"].pop()),
        ("timing round null", set_(["timing", "rounds", r], None)),
        ("timing round a list", set_(["timing", "rounds", r], [])),
        ("timing round seconds a string", lambda d: d["timing"]["rounds"][r].update(e="x")),
        ("timing without wall_seconds", pop(["timing", "wall_seconds"])),
        ("wall_seconds a string", set_(["timing", "wall_seconds"], "x")),
        ("wall_seconds null", set_(["timing", "wall_seconds"], None)),
        ("wall_seconds NaN", set_(["timing", "wall_seconds"], math.nan)),
        ("format of another version", set_(["format"], "attnctl.headhunter/2")),
    ]
    return rows


def _softpag_file_cases(ctx: Context) -> list[Case]:
    import attnctl

    good = {"format": "attnctl.headhunter/1", "selected": [f"{MID}:0", f"{MID}:1"]}
    files = [
        ("a missing file", str(ctx.dir / "nowhere.json")),
        ("a folder", ctx.folder("heads-folder")),
        ("an empty file", ctx.file("heads-empty.json", "")),
        ("not UTF-8", ctx.file("heads-latin1.json", b"\xff\xfe{}")),
        ("not JSON", ctx.file("heads-bad.json", "{")),
        ("a JSON list", ctx.file("heads-list.json", "[]")),
        ("no 'selected'", ctx.file("heads-noselected.json", "{}")),
        ("'selected' null", ctx.file("heads-null.json", '{"selected": null}')),
        ("'selected' empty", ctx.file("heads-emptysel.json", '{"selected": []}')),
        ("'selected' a string", ctx.file("heads-str.json", '{"selected": "a:0"}')),
        ("'selected' of numbers", ctx.file("heads-num.json", '{"selected": [5]}')),
        ("a head without a colon", ctx.file("heads-colon.json", '{"selected": ["nocolon"]}')),
        ("head 'x'", ctx.file("heads-x.json", json.dumps({"selected": [f"{MID}:x"]}))),
        ("head '²'", ctx.file("heads-sup.json", json.dumps({"selected": [f"{MID}:²"]}))),
        ("a head the layer lacks", ctx.file("heads-999.json", json.dumps({"selected": [f"{MID}:999"]}))),
        ("a layer the model lacks", ctx.file("heads-nope.json", json.dumps({"selected": ["nope:0"]}))),
        (
            "100,000 nested lists",
            ctx.file("heads-deep.json", '{"selected": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ),
        ("/proc/self/mem", "/proc/self/mem"),
        ("/dev/null", "/dev/null"),
    ]
    cases = [
        Case(
            "headhunter",
            "SoftPAG(heads=RESULT)",
            f"heads: {label}",
            run=lambda path=path: run_controls(ctx, [attnctl.SoftPAG(heads=path)]),
            names=("heads", Path(path).name),
        )
        for label, path in files
    ]
    result = ctx.file("heads-good.json", json.dumps(good))
    for top in (0, -1, 3, 10**30, 1.5, "1", True, math.nan):
        cases.append(
            Case(
                "headhunter",
                "SoftPAG(heads=RESULT, top=...)",
                f"top={top!r}",
                run=lambda top=top: run_controls(ctx, [attnctl.SoftPAG(heads=result, top=top)]),
                names=("top",),
            )
        )
    return cases


def _search_cases(ctx: Context) -> list[Case]:
    from attnctl.headhunter import candidate_heads, objective_from_name, search

    def flat(images, prompts):
        return [0.5] * len(images)

    a_file = ctx.file("search-a-file", "")

    def run_search(**kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            pipe = ctx.pipe("sd")
            heads = candidate_heads(pipe, [MID])[:2]
            args = dict(
                candidates=heads,
                samples=1,
                rounds=1,
                top_k=1,
                steps=1,
                batch_size=1,
                call_kwargs={"height": 32, "width": 32},
                progress=False,
                out=None,
            )
            args.update(kw)
            prompts = args.pop("prompts", ["a cat"])
            objective = args.pop("objective", flat)
            return search(pipe, prompts, objective, **args)

        return run

    def nan_scores(images, prompts):
        return [math.nan] * len(images)

    def two_scores(images, prompts):
        return [1.0, 1.0]

    def text_scores(images, prompts):
        return ["x"] * len(images)

    rows: list[tuple[str, dict, tuple[str, ...]]] = []
    for name, values in {
        "samples": [0, -1, 1.5, "1", True, 10**30],
        "rounds": [0, -1, 1.5, 10**30, 3],
        "top_k": [0, 1.5, 3, 10**30],
        "batch_size": [0, -1, 1.5, 10**30],
        "steps": [0, -1, 1.5, 10**30, 2**62],
        "seeds": [[], [1, 2], ["a"], [1.5], [True], [-1], [10**30], "1"],
        "candidates": [[], ["nope"], [f"{MID}:0", f"{MID}:0"], "x", [5], [f"{MID}:99"]],
        "u": [math.nan, math.inf, -1, 2, "1"],
        "scale": [math.nan, math.inf, -1, "3"],
        "guidance_scale": [math.nan, math.inf, -1.0, "x"],
        "prompts": [[], [""], "a cat", [5], None],
        "objective": ["testbed", nan_scores, two_scores, text_scores, None],
        "out": [str(ctx.dir), "/proc/x.json", a_file + "/x.json", ctx.device()],
    }.items():
        for v in values:
            shown = v.__name__ if callable(v) else _short(repr(v), 50)
            names = (f"{name}=", name, "objective") if name == "objective" else (f"{name}=", name)
            rows.append((f"search({name}={shown})", {name: v}, names))
    cases = [
        Case("headhunter", "headhunter.search", label, run=run_search(**kw), names=names)
        for label, kw, names in rows
    ]
    for name in ("", "clip:", "clip:/nowhere", f"clip:{ctx.dir}", "CLIP:x", "testbed ", "pickscore"):
        cases.append(
            Case(
                "headhunter",
                "objective_from_name",
                repr(name),
                run=lambda name=name: objective_from_name(name),
                names=("objective", name),
            )
        )
    for layers in (["nope"], [999], [-1], [None], [1.5], ["("], [MID.replace("attn1", "attn2")], []):
        cases.append(
            Case(
                "headhunter",
                "candidate_heads",
                f"layers={layers!r}",
                run=lambda layers=layers: candidate_heads(ctx.pipe("sd"), layers),
                names=("layers",),
            )
        )
    return cases


# ---- running and reporting -------------------------------------------------------------------------
def table(outcomes: list[Outcome]) -> str:
    rows = [("area", "tried", *OUTCOMES)]
    for area in [*AREAS, "total"]:
        mine = [o for o in outcomes if area in (o.area, "total")]
        if not mine:
            continue
        rows.append((area, str(len(mine)), *(str(sum(o.outcome == k for o in mine)) for k in OUTCOMES)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    )


def counts(outcomes: list[Outcome]) -> dict:
    out = {}
    for area in [*AREAS, "total"]:
        mine = [o for o in outcomes if area in (o.area, "total")]
        if mine:
            out[area] = {"tried": len(mine), **{k: sum(o.outcome == k for o in mine) for k in OUTCOMES}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="Write the counts and every case's outcome here.")
    parser.add_argument("--areas", default=",".join(AREAS), help="Comma-separated: " + ", ".join(AREAS))
    parser.add_argument("--timeout", type=float, default=20.0, help="Seconds per case (default 20).")
    parser.add_argument("--sample", type=int, default=None, help="At most this many cases per area (seeded).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    parser.add_argument(
        "--exec-check", type=int, default=0, help="Rerun this many command cases as real processes."
    )
    parser.add_argument("--quiet", action="store_true", help="No progress lines.")
    parser.add_argument(
        "--before",
        type=Path,
        help="A previous run's JSON (e.g. on the code before a fix): its counts and cases that were not "
        "clear are kept in this run's JSON under 'before'.",
    )
    parser.add_argument("--before-label", default="", help="What the previous run was (e.g. its commit).")
    args = parser.parse_args()
    areas = [a.strip() for a in args.areas.split(",") if a.strip()]
    unknown = [a for a in areas if a not in AREAS]
    if unknown:
        parser.error(f"--areas {','.join(unknown)}: not one of {', '.join(AREAS)}")
    if args.before is not None and not args.before.is_file():
        parser.error(f"--before {str(args.before)!r}: no such file")

    import torch

    torch.set_num_threads(args.threads)
    import diffusers  # noqa: F401

    import attnctl  # noqa: F401  - imported once, before the command cases fork
    import attnctl.cli  # noqa: F401
    import attnctl.headhunter  # noqa: F401
    import attnctl.testbed.bench  # noqa: F401

    with contextlib.redirect_stderr(io.StringIO()):
        import attnctl.ui.app  # noqa: F401 - gradio

    started = time.perf_counter()
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="attnctl-audit-") as tmp:
        ctx = Context(Path(tmp))
        ctx.timeout = args.timeout
        builders = {"api": api_cases, "cli": cli_cases, "demo": demo_cases, "headhunter": headhunter_cases}
        exec_checks = []
        for area in areas:
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cases = builders[area](ctx)
            if args.sample is not None and len(cases) > args.sample:
                cases = sorted(random.Random(0).sample(cases, args.sample), key=cases.index)
            area_start = time.perf_counter()
            for i, case in enumerate(cases):
                if case.argv is not None:
                    result = run_command(case, args.timeout, ctx.dir)
                else:
                    result = run_in_process(case, args.timeout)
                outcomes.append(result)
                if not args.quiet and (result.outcome not in ("clear", "valid") or i % 100 == 0):
                    print(
                        f"[{area} {i + 1}/{len(cases)}] {result.outcome:7} {result.group}: {_short(result.input, 100)}"
                        + (f" -> {_short(result.why, 80)}" if result.outcome not in ("clear",) else ""),
                        flush=True,
                    )
            if not args.quiet:
                print(f"{area}: {len(cases)} cases in {time.perf_counter() - area_start:.0f} s", flush=True)
            if area == "cli" and args.exec_check:
                picks = random.Random(1).sample(cases, min(args.exec_check, len(cases)))
                for case in picks:
                    forked = next(o for o in outcomes if o.area == "cli" and o.input == case.input)
                    real = run_exec(case, args.timeout, ctx.dir)
                    exec_checks.append(
                        {
                            "input": case.input,
                            "forked": forked.outcome,
                            "process": real.outcome,
                            "process_message": real.message,
                        }
                    )
                    if not args.quiet:
                        print(
                            f"exec check: {case.input}: forked {forked.outcome}, process {real.outcome}",
                            flush=True,
                        )
    seconds = time.perf_counter() - started
    print()
    print(table(outcomes))
    bad = [o for o in outcomes if o.outcome not in ("clear", "valid")]
    if bad:
        print(f"\n{len(bad)} cases not clear:")
        for o in bad:
            print(f"- [{o.area}] {o.outcome} ({o.why}) {o.group}: {_short(o.input, 160)}")
            if o.message:
                print(f"    {_short(o.message, 300)!r}")
    valid = [o for o in outcomes if o.outcome == "valid"]
    if valid:
        print(f"\n{len(valid)} cases valid (accepted rightly):")
        for o in valid:
            print(f"- [{o.area}] {o.group}: {_short(o.input, 120)} ({o.why})")
    print(f"\n{len(outcomes)} cases in {seconds:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {"counts": counts(outcomes)}
        if args.before:
            before = json.loads(args.before.read_text())
            report["before"] = {
                "what": args.before_label,
                **{k: before[k] for k in ("counts", "seconds", "exec_checks", "not_clear") if k in before},
            }
        report |= {
            "seconds": round(seconds, 1),
            "timeout_s": args.timeout,
            "threads": args.threads,
            "sample": args.sample,
            "exec_checks": exec_checks,
            "not_clear": [dataclasses.asdict(o) for o in bad],
            "cases": [dataclasses.asdict(o) for o in outcomes],
        }
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
