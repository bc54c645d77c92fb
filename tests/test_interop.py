"""attnctl under the ways people run big models: torch.compile, processors changed in the block."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


def _run(pipe, family, *controls, **overrides):
    with attnctl.control(pipe, *controls) as ctl:
        out = pipe(
            prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs(family, **overrides)
        )
    return out.images, ctl


def test_a_compiled_denoiser_is_controlled_as_the_eager_one():
    """`pipe.transformer = torch.compile(pipe.transformer)`, the usual way: attnctl controls the module
    the wrapper compiles; outputs and maps equal the eager run's. Dynamo compiles once per set of
    controls (the session's hook replaces the module's forward): a second run compiles nothing."""
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline("flux")
    eager, eager_ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]), num_inference_steps=4)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer)
    compiled, ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]), num_inference_steps=4)
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert torch.allclose(ctl.maps["cat"], eager_ctl.maps["cat"], atol=1e-6)
    counters.clear()
    again, _ = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]), num_inference_steps=4)
    assert counters["stats"]["unique_graphs"] == 0 and torch.equal(again, compiled)
    assert "forward" not in vars(pipe.transformer._orig_mod)


@pytest.mark.parametrize("how", ["wrapper", "in place", "repeated blocks"])
def test_fullgraph_compilation_is_refused_at_entry_naming_the_controls(how):
    pipe = tiny_pipeline("flux")
    if how == "wrapper":
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    elif how == "in place":
        pipe.transformer.compile(fullgraph=True)
    else:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    with pytest.raises(
        ValueError, match=r"^AttentionMaps, PAG cannot run in a denoiser compiled with fullgraph=True"
    ):
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"]), attnctl.PAG([0])):
            pass


def test_attention_slicing_enabled_inside_the_block_is_honoured_and_stays():
    """enable_attention_slicing() inside the block: the next denoiser call finds the new processors
    and wraps them, maps are still recorded, and on exit the user's sliced processors remain."""
    pipe = tiny_pipeline("sd")
    plain, plain_ctl = _run(pipe, "sd", attnctl.AttentionMaps(["cat"]))
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        pipe.enable_attention_slicing()
        out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("sd")).images
    assert torch.allclose(out, plain, atol=1e-5)
    assert torch.allclose(ctl.maps["cat"], plain_ctl.maps["cat"], atol=1e-6)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}


def test_a_processor_attnctl_cannot_read_set_inside_the_block_is_one_error_and_stays():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tiny_pipeline("flux")
    with pytest.raises(
        ValueError, match="changed inside attnctl.control to AttnProcessor2_0, which attnctl cannot"
    ):
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])):
            pipe.transformer.set_attn_processor(AttnProcessor2_0())
            pipe(prompt=PROMPT, **tiny_call_kwargs("flux"))
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"AttnProcessor2_0"}


def test_the_familys_own_processor_set_inside_the_block_is_wrapped():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    pipe = tiny_pipeline("flux")
    plain, plain_ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]))
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        pipe.transformer.set_attn_processor(FluxAttnProcessor())
        out = pipe(
            prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("flux")
        ).images
    assert torch.equal(out, plain) and torch.equal(ctl.maps["cat"], plain_ctl.maps["cat"])
    assert all(type(p) is FluxAttnProcessor for p in pipe.transformer.attn_processors.values())
