"""IP-Adapter pipelines under attnctl: the UNet adapter adds the decoupled image-prompt streams
exactly as diffusers' IPAdapterAttnProcessor2_0 does (with and without `ip_adapter_masks`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

import attnctl
from attnctl.tiny import add_tiny_ip_adapter, tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


def picture(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def ip_pipe(request):
    return request.param, add_tiny_ip_adapter(tiny_pipeline(request.param))


def _run(pipe, family, **kwargs):
    call = tiny_call_kwargs(family, height=64, width=64, **kwargs)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images


def test_tiny_adapter_loads_through_diffusers(ip_pipe):
    _, pipe = ip_pipe
    kinds = {type(p).__name__ for n, p in pipe.unet.attn_processors.items() if n.endswith("attn2.processor")}
    assert kinds == {"IPAdapterAttnProcessor2_0"}
    assert pipe.unet.config.encoder_hid_dim_type == "ip_image_proj"


def test_streams_match_diffusers_without_masks(ip_pipe):
    family, pipe = ip_pipe
    images = [[picture(0), picture(1)]]  # one adapter, two images attended together
    base = _run(pipe, family, ip_adapter_image=images)
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        out = _run(pipe, family, ip_adapter_image=images)
    assert torch.equal(out, base) and ctl.maps["cat"].dim() == 2
    # the image prompt matters
    assert not torch.equal(_run(pipe, family, ip_adapter_image=[[picture(2), picture(1)]]), base)


def test_streams_match_diffusers_with_masks(ip_pipe):
    family, pipe = ip_pipe
    left = np.zeros((64, 64), dtype=np.uint8)
    left[:, :32] = 255
    masks = IPAdapterMaskProcessor().preprocess([Image.fromarray(left), Image.fromarray(255 - left)], 64, 64)
    kwargs = dict(
        ip_adapter_image=[[picture(0), picture(1)]],
        cross_attention_kwargs={"ip_adapter_masks": [masks.reshape(1, 2, 64, 64)]},
    )
    base = _run(pipe, family, **kwargs)
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])):
        out = _run(pipe, family, **kwargs)
    assert torch.equal(out, base)
