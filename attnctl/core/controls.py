"""Controls are data: small validated dataclasses with a JSON round-trip.

Every attention-control method is a `Control` subclass. A control holds no tensors and no model
references, so the CLI, the web demo, saved experiment configs and search results all share the same
objects. Bad values raise `ValueError` at construction, naming the field, the value and what is
allowed. What a control *does* lives in `install(session)`, called by `attnctl.control(...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

_REGISTRY: dict[str, type[Control]] = {}


@dataclasses.dataclass
class Control:
    """Base class of every control. Subclasses are dataclasses and register by class name."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind = cls.__name__
        _REGISTRY[cls.kind] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for bad field values (override; call `check`)."""

    def install(self, session: Any) -> None:  # pragma: no cover - every control overrides this
        raise NotImplementedError(f"{type(self).__name__} does not implement install()")

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.kind, **fields}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Control:
        data = dict(data)
        kind = data.pop("kind", None)
        if kind not in _REGISTRY:
            raise ValueError(f"unknown control kind {kind!r}; known kinds: {', '.join(sorted(_REGISTRY))}")
        return _REGISTRY[kind](**data)


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


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise the project's standard error for a bad field: `name=value: allowed`."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


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
    """A real (or integer) number in [low, high] (or (low, high] with low_open)."""
    types: tuple[type, ...] = (int,) if integer else (int, float)
    ok = isinstance(value, types) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    bracket = "(" if low_open else "["
    kind = "an integer" if integer else "a number"
    check(ok, name, value, f"{kind} in {bracket}{lo}, {hi}]")
