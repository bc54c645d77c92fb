"""Property tests over every control's fields (hypothesis): bad values raise a ValueError naming
the field; valid values construct, round-trip through JSON, and a bounded sample runs on a tiny model.
Example counts are bounded so the suite stays fast."""

from __future__ import annotations

import json
import math

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fields import REQUIRED  # noqa: E402

from attnctl.core.controls import _REGISTRY, INT_MAX, Control, FieldSpec  # noqa: E402

CONTROLS = sorted(REQUIRED)
SPECS = [
    (name, spec) for name in CONTROLS for spec in _REGISTRY[name].fields() if spec.name not in REQUIRED[name]
]


def _valid(spec: FieldSpec) -> st.SearchStrategy:
    """Values the field's rule accepts (numbers inside their bounds, a choice, a bool, ...)."""
    if spec.kind in ("number", "integer"):
        integer = spec.kind == "integer"
        low = spec.low if spec.low is not None else (-INT_MAX if integer else -1e6)
        high = spec.high if spec.high is not None else (INT_MAX if integer else 1e6)
        if integer:
            low = int(low) + (1 if spec.low_open else 0)
            high = int(high) - (1 if spec.high_open else 0)
            return st.integers(low, high)
        return st.floats(low, high, exclude_min=spec.low_open, exclude_max=spec.high_open, allow_nan=False)
    if spec.kind == "bool":
        return st.booleans()
    if spec.kind == "choice":
        return st.sampled_from(spec.choices)
    if spec.kind == "steps":
        return st.lists(st.integers(0, 1000), min_size=1, max_size=4)
    if spec.kind == "words":
        return st.lists(st.sampled_from(["cat", "frog", "red circle"]), min_size=1, max_size=2, unique=True)
    return st.just(spec.default)


def _invalid(spec: FieldSpec) -> st.SearchStrategy:
    """Values the rule refuses: wrong types, and numbers past a bound or not finite."""
    wrong = st.sampled_from([object(), {"a": 1}, b"x"])
    if spec.kind in ("number", "integer"):
        outside = [math.nan, math.inf, -math.inf, "1"]
        if spec.low is not None:
            outside.append(spec.low - 1 if not spec.low_open else spec.low)
        if spec.high is not None:
            outside.append(spec.high + 1 if not spec.high_open else spec.high)
        if spec.kind == "integer":
            outside += [1.5, INT_MAX + 1]
        return st.sampled_from(outside) | wrong
    if spec.kind == "bool":
        return st.sampled_from([0, 1, "yes", None if not spec.optional else "no"]) | wrong
    if spec.kind == "choice":
        return st.text(min_size=1, max_size=8).filter(lambda t: t not in (spec.choices or ())) | wrong
    if spec.kind in ("steps", "words"):
        return st.sampled_from([[], "x", [None]]) | wrong
    return wrong


@pytest.mark.parametrize("name, spec", SPECS, ids=[f"{n}.{s.name}" for n, s in SPECS])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bad_values_name_the_field(name, spec, data):
    value = data.draw(_invalid(spec))
    if spec.kind in ("layers", "regions", "data"):
        return  # structured fields have their own tests (test_fields.py, test_layout.py, test_softpag.py)
    with pytest.raises(ValueError) as err:
        _REGISTRY[name](**{**REQUIRED[name], spec.name: value})
    assert str(err.value).startswith(f"{spec.name}=")


@pytest.mark.parametrize("name", CONTROLS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_valid_values_construct_and_round_trip_through_json(name, data):
    cls = _REGISTRY[name]
    values = {
        spec.name: data.draw(_valid(spec), label=spec.name)
        for spec in cls.fields()
        if spec.name not in REQUIRED[name]
    }
    try:
        control = cls(**{**REQUIRED[name], **values})
    except ValueError as err:  # a rule across fields (e.g. SoftPAG's top needs a result file)
        assert str(err).split("=")[0] in values, str(err)
        return
    again = Control.list_from_json(json.dumps([control.to_dict()]))[0]
    assert again == control


@pytest.mark.parametrize("name", [n for n in CONTROLS if n != "DraftAttention"])
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_a_sample_of_valid_values_runs_without_an_obscure_error(name, data, tiny_sd):
    """A bounded sample runs on tiny SD: to an image, or to one ValueError that names what is wrong
    (e.g. steps beyond the run); nothing else escapes."""
    import torch

    import attnctl
    from attnctl.tiny import tiny_call_kwargs

    cls = _REGISTRY[name]
    fields = {s.name: s for s in cls.fields() if s.name not in REQUIRED[name]}
    values = {
        n: data.draw(_valid(s), label=n)
        for n, s in fields.items()
        if s.kind in ("number", "integer", "bool", "choice")
    }
    for n in ("iterations", "max_refinement"):
        if n in values:
            values[n] = min(values[n], 3)  # bounded work
    required = {**REQUIRED[name]}
    if name == "SoftPAG":
        required["heads"] = {"mid_block.attentions.0.transformer_blocks.0.attn1": [0]}
    try:
        control = cls(**{**required, **values})
    except ValueError as err:  # a rule across fields
        assert str(err).split("=")[0] in values, str(err)
        return
    try:
        with attnctl.control(tiny_sd, control):
            out = tiny_sd("a cat and a frog red circle", **tiny_call_kwargs("sd")).images
    except ValueError:
        return  # a clear refusal (its message is tested where it is raised)
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def tiny_sd():
    from attnctl.tiny import tiny_pipeline

    return tiny_pipeline("sd")
