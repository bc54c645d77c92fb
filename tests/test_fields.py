"""Controls' field metadata: one rule per field, read by validation, the CLI and the web demo."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch

import attnctl
from attnctl.core.controls import _REGISTRY, Control, FieldSpec
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

# the fewest values each control needs to be built; every other field keeps its default
REQUIRED = {
    "AttentionMaps": {},
    "AttentionRegulation": {"targets": ["cat"]},
    "AttendAndExcite": {"tokens": ["cat"]},
    "AStar": {"concepts": ["cat", "frog"]},
    "SoftPAG": {"heads": ["mid_block.attentions.0.transformer_blocks.0.attn1:0"]},
    "PAG": {"layers": ["mid_block"]},
    "Layout": {"regions": [attnctl.Region((0, 0, 0.5, 1), "a cat")]},
    "DraftAttention": {},
}


def _controls():
    return [(name, cls) for name, cls in sorted(_REGISTRY.items()) if name in REQUIRED]


def test_every_public_control_is_covered():
    public = {name for name in attnctl.__all__ if isinstance(getattr(attnctl, name), type)}
    controls = {n for n in public if issubclass(getattr(attnctl, n), Control) and n != "Control"}
    assert controls == set(REQUIRED)


@pytest.mark.parametrize("name, cls", _controls())
def test_every_field_has_a_rule_and_help(name, cls):
    specs = cls.fields()
    assert [s.name for s in specs] == [f.name for f in dataclasses.fields(cls)]
    for spec in specs:
        assert spec.help.strip(), f"{name}.{spec.name} has no help"
        if spec.kind == "choice":
            assert spec.default in spec.choices
    built = cls(**REQUIRED[name])
    for spec in specs:  # the defaults pass their own rule
        value = getattr(built, spec.name)
        assert spec.accepts(value) or spec.name in REQUIRED[name] or spec.kind in ("data", "regions")


def _outside(spec: FieldSpec):
    """Values the rule refuses, just past each bound (and a wrong type)."""
    bad = ["x"]
    if spec.low is not None:
        bad.append(spec.low if spec.low_open else spec.low - (1 if spec.kind == "integer" else 1e-3))
    if spec.high is not None:
        bad.append(spec.high if spec.high_open else spec.high + (1 if spec.kind == "integer" else 1e-3))
    if spec.kind == "integer":
        bad += [1.5, 2**63, -(2**63)]  # past a 64-bit integer: what torch and numpy take
    if spec.kind == "number":
        bad += [math.nan, math.inf, -math.inf]  # a non-finite value would make the image NaN
    return bad


@pytest.mark.parametrize("name, cls", _controls())
def test_bad_numbers_and_choices_name_the_field_and_the_real_range(name, cls):
    checked = 0
    for spec in cls.fields():
        if spec.kind in ("number", "integer", "choice", "bool"):
            values = _outside(spec) if spec.kind != "bool" else ["yes", 1]
            if spec.kind == "choice":
                values = ["bogus"]
            for value in values:
                with pytest.raises(ValueError) as err:
                    cls(**{**REQUIRED[name], spec.name: value})
                assert str(err.value).startswith(f"{spec.name}=")
                assert spec.allowed() in str(err.value)
                checked += 1
    assert checked > 0 or name == "AttentionMaps"


def test_sparsity_message_is_the_real_range():
    with pytest.raises(ValueError, match=r"sparsity=1\.0 .*\[0, 1\)"):
        attnctl.DraftAttention(sparsity=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        attnctl.DraftAttention(sparsity=1.5)
    attnctl.DraftAttention(sparsity=0.0)


@pytest.mark.parametrize(
    "name, cls",
    [
        (n, c)
        for n, c in _controls()
        if "layers" in REQUIRED[n] or any(s.name == "layers" for s in c.fields())
    ],
)
@pytest.mark.parametrize("layers", [[], [-1], [""], [True], "up_blocks.1"])
def test_bad_layers_fail_at_construction(name, cls, layers):
    with pytest.raises(ValueError, match="^layers="):
        cls(**{**REQUIRED[name], "layers": layers})


def test_words_and_steps_rules():
    for bad in ([], [""], "cat", [1]):
        with pytest.raises(ValueError, match="^targets="):
            attnctl.AttentionRegulation(targets=bad)
    for bad in ([], [-1], [1.0], [True]):
        with pytest.raises(ValueError, match="^steps="):
            attnctl.AttentionMaps(steps=bad)


def test_from_dict_lists_the_allowed_fields():
    with pytest.raises(
        ValueError, match=r"AttentionMaps has no field 'layer'; its fields: tokens, layers, steps"
    ):
        Control.from_dict({"kind": "AttentionMaps", "layer": [1]})
    with pytest.raises(ValueError, match="a dict with a 'kind'"):
        Control.from_dict(["AttentionMaps"])


def test_controls_from_json_text():
    controls = [attnctl.AttentionMaps(["cat"]), attnctl.AStar(["cat", "frog"], scale=10.0)]
    text = json.dumps([c.to_dict() for c in controls])
    assert Control.list_from_json(text) == controls
    assert Control.list_from_json(json.dumps(controls[0].to_dict())) == controls[:1]
    assert Control.list_from_json("  ") == []
    with pytest.raises(ValueError, match="not valid JSON"):
        Control.list_from_json("[{")
    with pytest.raises(ValueError, match="JSON list of control dicts"):
        Control.list_from_json('"AStar"')
    with pytest.raises(ValueError, match="^scale="):
        Control.list_from_json('[{"kind": "AStar", "concepts": ["a"], "scale": -1}]')


def test_fields_defaults_are_json():
    for _, cls in _controls():
        json.dumps([dataclasses.asdict(s) for s in cls.fields()])


# ---- steps beyond the run -----------------------------------------------------------------------
def _generate(pipe, *controls, steps=3):
    kwargs = tiny_call_kwargs("sd", num_inference_steps=steps)
    with attnctl.control(pipe, *controls) as ctl:
        pipe("a cat and a frog", generator=torch.Generator().manual_seed(0), **kwargs)
    return ctl


def test_steps_beyond_the_run_raise_or_warn():
    pipe = tiny_pipeline("sd")
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(
        ValueError, match=r"AttentionMaps.steps=\[30\]: no step of this 3-step run \(steps 0 to 2\)"
    ):
        _generate(pipe, attnctl.AttentionMaps(["cat"], steps=[30]))
    assert dict(pipe.unet.attn_processors) == before
    with pytest.warns(UserWarning, match=r"steps \[30\] lie beyond this 3-step run"):
        ctl = _generate(pipe, attnctl.AttentionMaps(["cat"], steps=[1, 30]))
    assert ctl.maps["cat"].abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _generate(pipe, attnctl.AttentionMaps(["cat"], steps=[0, 2]))


@pytest.mark.parametrize(
    "text",
    [
        '{"kind": ["AStar"]}',
        '[{"kind": "AStar", "concepts": ["cat"], "scale": Infinity}]',
        '[{"kind": "AStar", "concepts": ["cat"], "scale": 1e400}]',
        '[{"kind": "AStar", "concepts": ["cat"], "scale": [1]}]',
        '[{"kind": "AStar", "concepts": {"cat": 1}}]',
        "[" * 100_000 + "]" * 100_000,
        '[{"kind": "Layout", "regions": [{"box": [0, 0, 1, 1], "prompt": "a", "priority": 1e30}]}]',
    ],
)
def test_malformed_controls_json_is_one_value_error(text):
    with pytest.raises(ValueError):
        Control.list_from_json(text)


def test_repeated_concepts_name_the_field():
    with pytest.raises(ValueError, match=r"concepts=\['cat', 'Cat'\] is not allowed: distinct words"):
        attnctl.AStar(["cat", "Cat"])


# ---- found by the bad-input audit (benchmarks/audit.py) ----------------------------------------------
@pytest.mark.parametrize("value", [1e39, 1e300])
def test_numbers_past_float32_name_the_field(value):
    """The models compute in float32 (or less): a larger number would be inf there (a NaN image, or
    a RuntimeError converting it)."""
    with pytest.raises(ValueError, match=r"^lr=.* is not allowed: a finite number in \(0, 3\.4e\+38\]"):
        attnctl.AttentionRegulation(["cat"], lr=value)
    attnctl.AttentionRegulation(["cat"], lr=3.4e38)  # the largest allowed


def test_a_json_number_of_too_many_digits_is_a_json_error():
    text = '[{"kind": "AStar", "concepts": ["cat"], "scale": ' + "9" * 5000 + "}]"
    with pytest.raises(ValueError, match=r"^controls are not valid JSON: a number of more than \d+ digits$"):
        Control.list_from_json(text)


def test_long_values_are_shortened_in_messages():
    for make in (
        lambda: attnctl.AStar([""] * 100_000),
        lambda: Control.from_dict({"kind": "x" * 100_000}),
        lambda: Control.from_dict({"kind": "AStar", "concepts": ["cat"], "y" * 100_000: 1}),
    ):
        with pytest.raises(ValueError) as err:
            make()
        message = str(err.value)
        assert len(message) < 1000 and "\n" not in message and "characters)" in message


@pytest.mark.parametrize(
    "thresholds",
    [{"²": 0.5}, {"0": True}, {"99999999999999999999": 0.5}, {"1.5": 0.5}, {"0": float("nan")}],
)
def test_bad_refinement_thresholds_name_the_field(thresholds):
    with pytest.raises(ValueError, match="^thresholds="):
        attnctl.AttendAndExcite(["cat"], thresholds=thresholds)
    text = json.dumps([{"kind": "AttendAndExcite", "tokens": ["cat"], "thresholds": thresholds}])
    with pytest.raises(ValueError, match="^thresholds="):
        Control.list_from_json(text)


@pytest.mark.parametrize("pool", [(10**30, 8), (8, 2**63)])
def test_draft_pool_and_blocks_are_64_bit_integers(pool):
    with pytest.raises(ValueError, match="^pool="):
        attnctl.DraftAttention(pool=pool)
    with pytest.raises(ValueError, match="^dense_blocks="):
        attnctl.DraftAttention(dense_blocks=(10**30,))


def test_a_long_word_not_in_the_prompt_is_shortened():
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError) as err:
        _generate(pipe, attnctl.AttentionMaps(["x" * 10_000]))
    assert len(str(err.value)) < 1000 and "is not in the prompt" in str(err.value)
