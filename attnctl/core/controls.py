"""Controls are data: small validated dataclasses with a JSON round-trip.

Every attention-control method is a `Control` subclass. A control holds no tensors and no model
references, so the CLI, the web demo, saved experiment configs and search results all share the same
objects. Bad values raise `ValueError` at construction, naming the field, the value and what is
allowed. What a control *does* lives in `install(session)`, called by `attnctl.control(...)`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, ClassVar

_REGISTRY: dict[str, type[Control]] = {}


KINDS = ("number", "integer", "bool", "choice", "text", "words", "layers", "steps", "regions", "data")
# Integers are bounded by what torch and numpy take (seeds, counts): a signed 64-bit integer.
INT_MAX = 2**63 - 1
# Numbers are bounded by what the models compute in: float32 (a larger value would be inf there).
FLOAT_MAX = 3.4e38


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What a control's field accepts, read by validation, the CLI and the web demo alike.

    kind: "number", "integer", "bool", "choice" (one of `choices`), "text", "words" (prompt words
    or phrases), "layers" (layer paths or block indices), "steps" (denoising step indices) or
    "data" (structured JSON the control validates itself, e.g. SoftPAG's heads).
    low/high: bounds of numbers (open with low_open/high_open). optional: None is allowed.
    """

    name: str
    kind: str
    help: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False

    def allowed(self) -> str:
        """The rule, in the words of the error a bad value gets."""
        if self.kind in ("number", "integer"):
            rule = _range_rule(self.kind == "integer", self.low, self.high, self.low_open, self.high_open)
        else:
            rule = {
                "bool": "True or False",
                "choice": f"one of {', '.join(self.choices or ())}",
                "text": "non-empty text",
                "words": "a non-empty list of non-empty prompt words (or phrases)",
                "layers": "a non-empty list of layer paths (strings) or block indices (integers >= 0)",
                "steps": "a non-empty list of denoising step indices (integers >= 0)",
                "regions": "a non-empty list of Region (box, prompt, image, priority, scale)",
                "data": "see the control's documentation",
            }[self.kind]
        return f"None or {rule}" if self.optional else rule

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind in ("number", "integer"):
            return _in_range(
                value, self.kind == "integer", self.low, self.high, self.low_open, self.high_open
            )
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return value in (self.choices or ())
        if self.kind == "text":
            return isinstance(value, str) and bool(value.strip())
        if self.kind == "data":
            return True
        if not isinstance(value, (list, tuple)) or not value:
            return False
        if self.kind == "regions":
            return True  # the Layout checks each Region
        if self.kind == "words":
            return all(isinstance(w, str) and w.strip() for w in value)
        if self.kind == "layers":
            return all((isinstance(x, str) and x.strip()) or (_is_int(x) and x >= 0) for x in value)
        return all(_is_int(x) and x >= 0 for x in value)  # steps


def param(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    kind: str | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] | None = None,
    optional: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A control's field with its rule and help: `x: float = param(0.5, help=..., low=0, high=1)`.

    The kind is taken from the default when not given (bool, int, float; `choices`: "choice").
    Lists and dicts take `default_factory`."""
    if kind is None:
        value = default_factory() if default is dataclasses.MISSING else default
        kind = (
            "choice"
            if choices is not None
            else "bool"
            if isinstance(value, bool)
            else "integer"
            if isinstance(value, int)
            else "number"
            if isinstance(value, float)
            else "data"
        )
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not allowed: one of {', '.join(KINDS)}")
    spec = {
        "kind": kind,
        "help": help,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": None if choices is None else tuple(choices),
        "optional": optional,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"attnctl": spec})


@dataclasses.dataclass
class Control:
    """Base class of every control. Subclasses are dataclasses and register by class name.

    Fields declared with `param(...)` are checked at construction by their rule; `validate()` adds
    what a rule cannot say (e.g. a field that depends on another)."""

    kind: ClassVar[str] = ""
    video_only: ClassVar[bool] = False  # acts on video models only (the demo shows it for those)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind = cls.__name__
        _REGISTRY[cls.kind] = cls

    def __post_init__(self) -> None:
        for spec in self.fields():
            value = getattr(self, spec.name)
            check(spec.accepts(value), spec.name, value, spec.allowed())
        self.validate()

    @classmethod
    def fields(cls) -> list[FieldSpec]:
        """Every field with its rule, help and default, in declaration order."""
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata.get("attnctl")
            if meta is None:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            out.append(FieldSpec(name=f.name, default=_plain(default), **meta))
        return out

    def validate(self) -> None:
        """Raise ValueError for what the fields' rules do not cover (override; call `check`)."""

    def install(self, session: Any) -> None:  # pragma: no cover - every control overrides this
        """Put the control's edits, wrappers and hooks on the session (each control's own)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement install()")

    def to_dict(self) -> dict[str, Any]:
        """The control as plain JSON data, `{"kind": ..., field: value, ...}` (`Control.from_dict` reads it)."""
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.kind, **fields}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Control:
        """The control a `to_dict()` describes; an unknown kind or field is an error listing the
        allowed ones."""
        if not isinstance(data, dict):
            raise ValueError(f"a control is a dict with a 'kind', got {data!r}")
        data = dict(data)
        kind = data.pop("kind", None)
        if not isinstance(kind, str) or kind not in _REGISTRY:
            raise ValueError(
                f"unknown control kind {shown(kind)}; known kinds: {', '.join(sorted(_REGISTRY))}"
            )
        cls = _REGISTRY[kind]
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ValueError(
                f"{kind} has no field {', '.join(map(shown, unknown))}; its fields: {', '.join(names)}"
            )
        return cls(**data)

    @staticmethod
    def list_from_json(text: str) -> list[Control]:
        """Controls from JSON text: a list of control dicts (or one dict), as `to_dict()` writes
        them. Bad JSON or a bad control is a ValueError naming what is wrong."""
        return Control.from_dicts(Control.dicts_from_json(text))

    @staticmethod
    def from_dicts(dicts: list[Any]) -> list[Control]:
        """The controls of a list of control dicts; any malformed entry is one ValueError."""
        try:
            return [Control.from_dict(d) for d in dicts]
        except (TypeError, RecursionError) as e:  # e.g. a list where a field takes a number
            raise ValueError(f"controls JSON does not describe controls: {e}") from None

    @staticmethod
    def dicts_from_json(text: str) -> list[dict[str, Any]]:
        """The control dicts of a controls JSON text, not yet built (what `list_from_json` builds)."""
        import json

        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"controls are not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError("controls are not valid JSON: nested too deeply") from None
        except ValueError:  # Python reads integers of at most sys.get_int_max_str_digits() digits
            digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
            raise ValueError(f"controls are not valid JSON: a number of more than {digits} digits") from None
        data = [data] if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise ValueError(f"controls must be a JSON list of control dicts, got {type(data).__name__}")
        return data


def _plain(value: Any) -> Any:
    """Tuples become lists and nested data (e.g. a Layout's Regions) their `to_dict()`, so that
    to_dict() is exactly what JSON gives back."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise the project's standard error for a bad field: `name=value: allowed`."""
    if not ok:
        raise ValueError(f"{name}={shown(value)} is not allowed: {allowed}")


def shown(value: Any, limit: int = 200) -> str:
    """`repr(value)` for an error message: at most `limit` characters (then its length)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_words(name: str, words: Any, *, allow_none: bool = False, min_len: int = 1) -> None:
    """A list of non-empty prompt words (or phrases)."""
    if words is None and allow_none:
        return
    ok = isinstance(words, (list, tuple)) and len(words) >= min_len
    ok = ok and all(isinstance(w, str) and w.strip() for w in words)
    need = f"a list of at least {min_len} non-empty word(s)" + (" or None" if allow_none else "")
    check(ok, name, words, need)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
    low_open: bool = False,
) -> None:
    """A finite real number (or a 64-bit integer) in [low, high] (or (low, high] with low_open)."""
    check(
        _in_range(value, integer, low, high, low_open), name, value, _range_rule(integer, low, high, low_open)
    )


def _in_range(
    value: Any,
    integer: bool,
    low: float | None,
    high: float | None,
    low_open: bool = False,
    high_open: bool = False,
) -> bool:
    """A finite number between the bounds: an int within INT_MAX either way (what torch takes), a
    float within FLOAT_MAX (float32's range)."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT_MAX):
        return False
    if isinstance(value, int) and abs(value) > INT_MAX:
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


def _range_rule(
    integer: bool, low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> str:
    """The words of a range: "a finite number in [0, 3.4e+38]", "an integer in [1, 1000]"."""
    if integer:
        lo = _num(-INT_MAX) if low is None else _num(low)
        hi = _num(INT_MAX) if high is None else _num(high)
        return f"an integer in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    lo = "[-3.4e+38" if low is None else f"{'(' if low_open else '['}{_num(low)}"
    hi = "3.4e+38]" if high is None else f"{_num(high)}{')' if high_open else ']'}"
    return f"a finite number in {lo}, {hi}"
