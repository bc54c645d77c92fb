"""Misuse that must end in one clear attnctl error and leave the pipeline exactly as it was:
nested control() on one pipeline, a control on a model it does not apply to, prompts without words."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


def _state(pipe):
    """What control() installs and must put back: processors, hooks, instance attributes. (An empty
    hook registry a pipeline's own cache contexts create stays, as it does without attnctl.)"""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return (
        dict(denoiser.attn_processors),
        sorted(getattr(getattr(denoiser, "_diffusers_hook", None), "hooks", {})),
        "forward" in vars(denoiser),
        {k for k in ("encode_prompt",) if k in vars(pipe)},
        "step" in vars(pipe.scheduler),
    )


def _same(a, b):
    procs_a, *rest_a = a
    procs_b, *rest_b = b
    return (
        procs_a.keys() == procs_b.keys()
        and all(procs_a[k] is procs_b[k] for k in procs_a)
        and rest_a == rest_b
    )


def _run(pipe, family="sd", prompt=PROMPT, **overrides):
    kwargs = tiny_call_kwargs(family, **{"num_inference_steps": 2, **overrides})
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs)


def test_nested_control_is_an_error_at_entry_and_the_outer_session_keeps_working():
    pipe = tiny_pipeline("sd")
    before = _state(pipe)
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as outer:
        inside = _state(pipe)
        with pytest.raises(ValueError, match="already inside an attnctl.control block"):
            with attnctl.control(pipe, attnctl.AttentionMaps(["frog"])):
                pass
        assert _same(_state(pipe), inside)  # the failed entry changed nothing
        _run(pipe)
    assert outer.maps.words() == ["cat"]
    assert _same(_state(pipe), before)
    # a *ControlPipeline call inside control() is the same nesting
    controlled = attnctl.pipelines.StableDiffusionControlPipeline.from_pipe(pipe)
    with attnctl.control(controlled):
        with pytest.raises(ValueError, match="already inside"):
            _run(controlled, controls=[attnctl.AttentionMaps(["cat"])])
    assert _same(_state(controlled), before)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_draft_attention_on_an_image_model_is_refused_at_install(family):
    pipe = tiny_pipeline(family)
    before = _state(pipe)
    with pytest.raises(ValueError, match=r"DraftAttention does not work on .*an image model"):
        with attnctl.control(pipe, attnctl.DraftAttention(0.5)):
            pass
    assert _same(_state(pipe), before)


def test_draft_attention_on_the_testbed_is_refused():
    from attnctl.testbed import load_pipeline

    with pytest.raises(
        ValueError, match="DraftAttention does not work on UNet2DConditionModel .*an image model"
    ):
        with attnctl.control(load_pipeline(), attnctl.DraftAttention()):
            pass


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_maps_of_an_empty_prompt_or_of_prompt_embeds_are_clear_errors(family):
    pipe = tiny_pipeline(family)
    before = _state(pipe)
    with pytest.raises(ValueError, match="the prompt '' has no words; .* tokens="):
        with attnctl.control(pipe, attnctl.AttentionMaps()):
            _run(pipe, family, prompt="")
    assert _same(_state(pipe), before)
    with pytest.raises(ValueError, match="'cat' is not in the prompt"):
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])):
            _run(pipe, family, prompt="")
    assert _same(_state(pipe), before)
    # words are found in the text, which prompt_embeds do not carry
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, device="cpu")
        call = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    else:
        embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
        call = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    for maps in (attnctl.AttentionMaps(), attnctl.AttentionMaps(["cat"])):
        with pytest.raises(ValueError, match=r"pass prompt=.* instead of prompt_embeds"):
            with attnctl.control(pipe, maps):
                _run(pipe, family, prompt=None, **call)
        assert _same(_state(pipe), before)


def test_testbed_and_tiny_are_reachable_from_import_attnctl_and_imported_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, attnctl\n"
        "assert 'attnctl.tiny' not in sys.modules and 'attnctl.testbed' not in sys.modules\n"
        "assert callable(attnctl.tiny.tiny_pipeline) and callable(attnctl.testbed.model_path)\n"
        "try:\n    attnctl.nope\nexcept AttributeError as e:\n    assert 'nope' in str(e)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
