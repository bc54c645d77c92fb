"""Tiny offline pipelines: every family builds the standard diffusers class and runs end to end."""

from __future__ import annotations

import pytest
import torch

from attnctl.tiny import (
    FAMILIES,
    VIDEO_FAMILIES,
    hunyuan_prompt_template,
    tiny_call_kwargs,
    tiny_pipeline,
    video_tokens,
)

PROMPT = "a cat and a frog"

PIPELINE_CLASS = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "wan": "WanPipeline",
    "cogvideox": "CogVideoXPipeline",
    "hunyuanvideo": "HunyuanVideoPipeline",
    "sana": "SanaPipeline",
    "lumina2": "Lumina2Pipeline",
    "cogview4": "CogView4Pipeline",
    "pixart": "PixArtSigmaPipeline",
    "auraflow": "AuraFlowPipeline",
    "hidream": "HiDreamImagePipeline",
    "chroma": "ChromaPipeline",
    "flux2": "Flux2Pipeline",
    "qwenimage": "QwenImagePipeline",
    "zimage": "ZImagePipeline",
    "wanvace": "WanVACEPipeline",
    "skyreelsv2": "SkyReelsV2Pipeline",
    "ltx": "LTXPipeline",
    "mochi": "MochiPipeline",
    "hunyuanvideo15": "HunyuanVideo15Pipeline",
    "kandinsky5": "Kandinsky5T2VPipeline",
    "qwenimage21": "QwenImage21Pipeline",
    "ltx2": "LTX2Pipeline",
}
# (denoiser calls per step, batch rows per call) with the default kwargs: CFG batches uncond + cond
# (sd, sdxl, sd3, cogvideox, pixart, auraflow, hidream, zimage), runs them as two calls (wan, lumina2,
# cogview4, chroma, qwenimage, wanvace, skyreelsv2), or is distilled into the model (flux, hunyuan, flux2).
DENOISER_CALLS = {
    "sd": (1, 2),
    "sdxl": (1, 2),
    "sd3": (1, 2),
    "flux": (1, 1),
    "wan": (2, 1),
    "cogvideox": (1, 2),
    "hunyuanvideo": (1, 1),
    "sana": (1, 2),
    "lumina2": (2, 1),
    "cogview4": (2, 1),
    "pixart": (1, 2),
    "auraflow": (1, 2),
    "hidream": (1, 2),
    "chroma": (2, 1),
    "flux2": (1, 1),
    "qwenimage": (2, 1),
    "zimage": (1, 2),
    "wanvace": (2, 1),
    "skyreelsv2": (2, 1),
    "ltx": (1, 2),
    "mochi": (1, 2),
    "hunyuanvideo15": (2, 1),  # the guider's forwards: the prompt's, then the negative prompt's
    "kandinsky5": (2, 1),
    "qwenimage21": (2, 1),  # true CFG: named cond and uncond forwards
    "ltx2": (1, 2),  # one "cond_uncond" forward (the tiny kwargs turn STG and modality isolation off)
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a shared 2-core machine two OpenMP threads spin-wait on each other: one is ~20x faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _first_tensor(args, kwargs):
    for value in (*args, kwargs.get("sample"), kwargs.get("hidden_states")):
        if isinstance(value, list):  # Z-Image: a list of per-row latents
            return torch.stack(value)
        if torch.is_tensor(value):
            return value
    raise AssertionError("denoiser called without a tensor input")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_the_standard_pipeline_and_runs(family):
    import diffusers

    pipe = tiny_pipeline(family)
    assert type(pipe) is getattr(diffusers, PIPELINE_CLASS[family])
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in _denoiser(pipe).parameters())

    batches = []
    _denoiser(pipe).register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(_first_tensor(args, kwargs).shape[0]), with_kwargs=True
    )
    kwargs = tiny_call_kwargs(family)
    out = pipe(prompt=PROMPT, **kwargs, generator=torch.Generator().manual_seed(0))  # FLUX.2: image first

    calls, rows = DENOISER_CALLS[family]
    assert batches == [rows] * (calls * kwargs["num_inference_steps"])
    if family in VIDEO_FAMILIES:
        assert out.frames.shape == (1, kwargs["num_frames"], 3, kwargs["height"], kwargs["width"])
        result = out.frames
    else:
        channels = 4 if family == "qwenimage21" else 3  # Qwen-Image 2.1's VAE decodes RGBA
        assert out.images.shape == (1, channels, kwargs["height"], kwargs["width"])
        result = out.images
    assert torch.isfinite(result).all()


def test_same_seed_same_weights_and_caller_rng_untouched():
    state = torch.get_rng_state()
    a, b, c = tiny_pipeline("flux"), tiny_pipeline("flux"), tiny_pipeline("flux", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    for name, value in a.transformer.state_dict().items():
        assert torch.equal(value, b.transformer.state_dict()[name])
    assert any(
        not torch.equal(v, c.transformer.state_dict()[k]) for k, v in a.transformer.state_dict().items()
    )


def test_same_seed_same_output():
    pipe = tiny_pipeline("sd")
    runs = [
        pipe(PROMPT, **tiny_call_kwargs("sd"), generator=torch.Generator().manual_seed(0)).images
        for _ in "ab"
    ]
    assert torch.equal(runs[0], runs[1])


def test_unknown_family_is_named_with_the_choices():
    with pytest.raises(ValueError, match="'sd4'.*sd, sdxl, sd3, flux, wan, cogvideox, hunyuanvideo"):
        tiny_pipeline("sd4")
    with pytest.raises(ValueError, match="'SD'"):
        tiny_call_kwargs("SD")


def test_call_kwargs_overrides_and_checks():
    kwargs = tiny_call_kwargs("wan", height=64, num_inference_steps=3, output_type="latent")
    assert (kwargs["height"], kwargs["width"], kwargs["num_inference_steps"]) == (64, 32, 3)
    assert kwargs["output_type"] == "latent"
    assert tiny_call_kwargs("sd")["guidance_scale"] > 1  # classifier-free guidance on
    with pytest.raises(ValueError, match="num_frames"):
        tiny_call_kwargs("sd", num_frames=9)
    # each call gets its own dicts: editing one does not leak into the next
    tiny_call_kwargs("hunyuanvideo")["prompt_template"]["crop_start"] = 0
    assert tiny_call_kwargs("hunyuanvideo")["prompt_template"]["crop_start"] > 0


def test_video_tokens_follow_the_kwargs():
    # 4x temporal + 8x spatial VAE and 2x2 patches: ((F - 1) // 4 + 1) * (H // 16) * (W // 16)
    for family in ("wan", "cogvideox", "hunyuanvideo"):
        latent_frames = 3 if family == "cogvideox" else 2  # 9 frames for CogVideoX, 5 for the others
        assert video_tokens(family) == latent_frames * 2 * 2
        assert video_tokens(family, height=64, width=48, num_frames=13) == 4 * 4 * 3
        assert video_tokens(family, height=512, width=512, num_frames=61) == 16_384
    # LTX-Video's tiny VAE: 4x temporal, 4x spatial, 1x1 patches (9 frames of 32 px: 3 x 8 x 8)
    assert video_tokens("ltx") == 3 * 8 * 8
    assert video_tokens("ltx", height=64, width=32, num_frames=13) == 4 * 16 * 8
    # Mochi: 6x temporal, 8x spatial, 2x2 patches (7 frames of 128 px: 2 x 8 x 8)
    assert video_tokens("mochi") == 2 * 8 * 8
    assert video_tokens("mochi", height=32, width=64, num_frames=13) == 3 * 2 * 4
    assert video_tokens("flux") == video_tokens("sd3") == 8 * 8
    with pytest.raises(ValueError, match="'sd'"):
        video_tokens("sd")


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuanvideo"])
def test_video_tokens_match_the_transformer_input(family):
    pipe = tiny_pipeline(family)
    shapes = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(_first_tensor(args, kwargs).shape), with_kwargs=True
    )
    overrides = {
        "height": 64,
        "width": 48,
        "num_frames": 13,
        "num_inference_steps": 1,
        "output_type": "latent",
    }
    pipe(PROMPT, **tiny_call_kwargs(family, **overrides), generator=torch.Generator().manual_seed(0))
    # latents are [B, C, F, H, W] (CogVideoX: [B, F, C, H, W]); 2x2 patches
    frames = shapes[0][1] if family == "cogvideox" else shapes[0][2]
    assert frames * (shapes[0][3] // 2) * (shapes[0][4] // 2) == video_tokens(family, **overrides)


def test_hunyuan_crop_start_removes_exactly_the_template():
    pipe = tiny_pipeline("hunyuanvideo")
    template = hunyuan_prompt_template()
    assert template == tiny_call_kwargs("hunyuanvideo")["prompt_template"]
    ids = pipe.tokenizer(template["template"].format(PROMPT))["input_ids"]
    kept = pipe.tokenizer.decode(ids[template["crop_start"] :])
    assert kept == PROMPT + "<|eot_id|>"
    # the pipeline pads on the right, so the crop keeps the prompt even when padded
    assert pipe.tokenizer.padding_side == "right"


def test_wan_runs_at_16k_video_tokens():
    family, overrides = "wan", {"height": 512, "width": 512, "num_frames": 61}
    assert video_tokens(family, **overrides) >= 16_384
    pipe = tiny_pipeline(family)
    kwargs = tiny_call_kwargs(
        family, **overrides, num_inference_steps=1, guidance_scale=1.0, output_type="latent"
    )
    latents = pipe(PROMPT, **kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert latents.shape == (1, 16, 16, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["cogvideox", "hunyuanvideo"])
def test_video_families_run_at_16k_video_tokens(family):
    overrides = {"height": 512, "width": 512, "num_frames": 61}
    assert video_tokens(family, **overrides) == 16_384
    kwargs = tiny_call_kwargs(
        family, **overrides, num_inference_steps=1, guidance_scale=1.0, output_type="latent"
    )
    latents = tiny_pipeline(family)(PROMPT, **kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(latents).all()


# The tiny Qwen-Image 2.1's Qwen3-VL processor has no video processor (transformers builds that
# only with torchvision, which is not installed), and save_pretrained needs one.
SAVABLE = [f for f in FAMILIES if f != "qwenimage21"]


@pytest.mark.parametrize("family", SAVABLE)
def test_pipeline_save_load_round_trip(family, tmp_path):
    pipe = tiny_pipeline(family)
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    # attributes, not saved, that tiny builders set: HiDream's sample size, HunyuanVideo 1.5's crop
    for name in ("default_sample_size", "prompt_template_encode_start_idx"):
        if hasattr(pipe, name):
            setattr(loaded, name, getattr(pipe, name))
    runs = [
        p(prompt=PROMPT, **tiny_call_kwargs(family), generator=torch.Generator().manual_seed(0))[0]
        for p in (pipe, loaded)
    ]
    assert torch.allclose(runs[0], runs[1], atol=1e-5)


def test_denoiser_config_overrides():
    pipe = tiny_pipeline("wan", num_layers=3, attention_head_dim=16)
    assert len(pipe.transformer.blocks) == 3 and pipe.transformer.config.attention_head_dim == 16
    with pytest.raises(ValueError, match="not WanTransformer3DModel config entries"):
        tiny_pipeline("wan", depth=3)


def test_overrides_of_entries_left_at_their_defaults_are_honoured():
    """Entries the tiny model was built with at their defaults (diffusers' `_use_default_values`)
    take an override too: SD3 with SD3.5's RMS q/k norms and dual (image-only) attention."""
    sd35 = tiny_pipeline("sd3", qk_norm="rms_norm", dual_attention_layers=(0,))
    block = sd35.transformer.transformer_blocks[0]
    assert sd35.transformer.config.qk_norm == "rms_norm"
    assert type(block.attn.norm_q).__name__ == "RMSNorm" and block.attn2 is not None
    assert getattr(sd35.transformer.transformer_blocks[1], "attn2", None) is None
    flux = tiny_pipeline("flux", out_channels=8)
    assert flux.transformer.config.out_channels == 8 and flux.transformer.proj_out.out_features == 8


def test_builds_in_two_threads_give_the_same_weights():
    import concurrent.futures

    alone = tiny_pipeline("flux").transformer.state_dict()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        built = list(pool.map(lambda _: tiny_pipeline("flux").transformer.state_dict(), range(4)))
    for state in built:
        assert state.keys() == alone.keys()
        assert all(torch.equal(state[k], alone[k]) for k in alone)
