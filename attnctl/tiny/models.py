"""Tiny offline models: every supported diffusers pipeline, built in code in well under a second.

`tiny_pipeline(family)` returns the *standard, unmodified* diffusers pipeline class of a family, filled
with tiny components built from fixed seeds (sizes follow diffusers' own fast tests), fp32 on CPU. No
file is read and nothing is downloaded (the tokenizers are learned offline, `tokenizers.py`).
`tiny_call_kwargs(family)` gives the call arguments for a quick end-to-end run:

    pipe = tiny_pipeline("flux")
    out = pipe("a cat and a frog", **tiny_call_kwargs("flux"), generator=torch.Generator().manual_seed(0))

Outputs are torch tensors (`output_type="pt"`): images `[B, 3, H, W]`, videos `[B, F, 3, H, W]`, in
[0, 1], so tests compare them with `torch.allclose` and need no PIL round trip.

Where the text tokens sit (what `attnctl.core.tokens.token_positions` positions map to):
  sd, sdxl   CLIP tokens 0..76 are the UNet's cross-attention keys (SDXL: both CLIP encoders are
             concatenated along channels, so the positions are the same).
  sd3        text keys = CLIP part (0..76) then T5 part: T5 position p is key 77 + p.
  flux       text keys = T5 (tokenizer_2) tokens 0..max_sequence_length-1; CLIP only gives the pooled vector.
  wan        text keys = T5/UMT5 tokens 0..max_sequence_length-1 (padding zeroed).
  cogvideox  text keys = T5 tokens 0..max_sequence_length-1, placed before the video tokens.
  hunyuan    text keys = Llama tokens of the templated prompt from `crop_start` on: key = p - crop_start
             for a position p in `prompt_template["template"].format(prompt)`.
  sana       text keys = `<bos>`, then the Gemma tokens of the lower-cased prompt after the complex
             human instruction (CHI): key = p - (n_chi - 2) for a position p in CHI + prompt.
  lumina2    text keys = Gemma tokens of `system_prompt + " <Prompt Start> " + prompt` (unpadded), then
             the image tokens, per sample.
  cogview4   text keys = GLM tokens `[gMASK] <sop> prompt` left-padded to a multiple of 16: key = p + pad.
  pixart     text keys = T5 tokens 0..max_sequence_length-1 of the lower-cased prompt (padding masked).
  auraflow   text keys = T5 tokens 0..max_sequence_length-1, after the model's 8 register tokens.
  hidream    keys after the image: T5 tokens 0..max_sequence_length-1, then the Llama tokens twice (the
             last `llama_layers` layer's and the block's own); attnctl's text keys are the T5 part.
  hunyuan    text keys = Llama tokens of the templated prompt from `crop_start` on: key = p - crop_start
             for a position p in `prompt_template["template"].format(prompt)`.
  chroma     text keys = T5 tokens 0..max_sequence_length-1, before the image tokens (as flux).
  flux2      text keys = Mistral chat tokens of [system turn, user turn with the prompt], padded.
  qwenimage  text keys = Qwen chat tokens of `prompt_template_encode.format(prompt)` from token 34 on
             (`prompt_template_encode_start_idx`; the tiny tokenizer spells the system turn in 34 too).
  wanvace    text keys as wan (the VACE control blocks attend to the same text).
  skyreelsv2 text keys as wan.
  zimage     text keys = Qwen chat tokens of the user turn with the prompt (unpadded), then pad tokens
             to a multiple of 32, after the image tokens (padded to a multiple of 32 as well).
  ltx        text keys = T5 tokens 0..max_sequence_length-1 (padding hidden by a -10000 key bias),
             cross-attention from the video tokens.
  mochi      text keys = T5 tokens of the prompt, unpadded (the processor runs one kernel call per
             batch row on [video ; that row's valid text]), after the video tokens.
  hunyuanvideo15  keys after the video: the ByT5 tokens of the prompt's quoted text (none without
             quotes), the Qwen chat tokens of [system, user] from `prompt_template_encode_start_idx` on
             (the tiny builder sets it to where the tiny tokenizer's template ends), then padding.
  qwenimage21 text keys = Qwen chat tokens of `prompt_template_t2i.format(prompt)` from `_drop_idx`
             on (its system turn dropped), before the image tokens; a prefill step's kernel calls
             run the text (causal) first, then the image over [text ; image].
  ltx2       video cross-attention keys = the connectors' output: `<bos>` and the Gemma tokens of the
             stripped prompt from key 0 on (the registers front-align them), then learnable registers.
  kandinsky5 cross-attention keys = Qwen tokens of `prompt_template.format(prompt)` from
             `prompt_template_encode_start_idx` on (set by the tiny builder as for hunyuanvideo15).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import CLIPTokenizer, T5Tokenizer

from .tokenizers import (
    build_clip_tokenizer,
    build_gemma_tokenizer,
    build_glm_tokenizer,
    build_llama_tokenizer,
    build_mistral_tokenizer,
    build_qwen_tokenizer,
    build_t5_tokenizer,
    default_corpus,
)

FAMILIES = (
    "sd",
    "sdxl",
    "sd3",
    "flux",
    "wan",
    "cogvideox",
    "hunyuanvideo",
    "sana",
    "lumina2",
    "cogview4",
    "pixart",
    "auraflow",
    "hidream",
    "chroma",
    "flux2",
    "qwenimage",
    "zimage",
    "wanvace",
    "skyreelsv2",
    "ltx",
    "mochi",
    "hunyuanvideo15",
    "kandinsky5",
    "qwenimage21",
    "ltx2",
)
VIDEO_FAMILIES = (
    "wan",
    "cogvideox",
    "hunyuanvideo",
    "wanvace",
    "skyreelsv2",
    "ltx",
    "mochi",
    "hunyuanvideo15",
    "kandinsky5",
    "ltx2",
)


def tiny_pipeline(
    family: str,
    seed: int = 0,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **denoiser_config: Any,
) -> Any:
    """Build the standard diffusers pipeline of `family` from tiny seeded components (fp32, CPU).

    `denoiser_config` overrides entries of the UNet/transformer config, e.g.
    `tiny_pipeline("wan", num_layers=8, attention_head_dim=64)` for a deeper model in benchmarks.
    `device` and `dtype` move the pipeline (default: CPU, fp32), the denoiser's
    `_keep_in_fp32_modules` kept in fp32 as `from_pretrained(torch_dtype=...)` keeps them; a denoiser
    built from overrides is built there directly, its weights drawn on the device in `dtype`, so a
    real-size denoiser needs neither a CPU copy nor an fp32 one (FLUX.1's 12B parameters: 24 GB in
    bf16, not 48 GB)."""
    builder = _BUILDERS.get(_check_family(family))
    with _private_rng(device):
        pipe = builder(seed)
        if denoiser_config:
            name = "unet" if hasattr(pipe, "unet") else "transformer"
            old = getattr(pipe, name)
            unknown = sorted(set(denoiser_config) - set(old.config))
            if unknown:
                raise ValueError(
                    f"{unknown} are not {type(old).__name__} config entries; known: {sorted(old.config)}"
                )
            torch.manual_seed(seed)
            with torch.device(device or "cpu"), _default_dtype(dtype):
                # Overrides as keyword arguments: in a config dict, diffusers would reset the entries
                # the model was built with at their defaults (`_use_default_values`) and drop them.
                denoiser = type(old).from_config(old.config, **denoiser_config).eval()
            pipe.register_modules(**{name: denoiser})
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    if dtype is not None:
        # As `from_pretrained(torch_dtype=...)` loads it: the modules the model names stay fp32.
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        keep = denoiser._keep_in_fp32_modules or ()
        for path, module in denoiser.named_modules():
            if any(name in path.split(".") for name in keep):
                module.float()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(family: str, **overrides: Any) -> dict[str, Any]:
    """Minimal call kwargs for a quick end-to-end run of `tiny_pipeline(family)`; overrides win.

    Two steps, small sizes, `output_type="pt"`. Classifier-free guidance is on for the families whose
    pipeline batches or runs an unconditional branch by default (sd, sdxl, sd3, wan, cogvideox); flux
    and hunyuanvideo are guidance-distilled, so `guidance_scale` is the embedded guidance and CFG stays
    off as in their normal use (pass `negative_prompt=..., true_cfg_scale=...` to turn on true CFG).
    Video token count: see `video_tokens`.
    """
    kwargs = dict(_CALL_KWARGS[_check_family(family)])
    if family == "hunyuanvideo":
        kwargs["prompt_template"] = hunyuan_prompt_template()
    if "num_frames" in overrides and family not in VIDEO_FAMILIES:
        raise ValueError(
            f"num_frames={overrides['num_frames']!r} is only for the video families {VIDEO_FAMILIES}"
        )
    kwargs.update(overrides)
    return kwargs


def video_tokens(family: str, **overrides: Any) -> int:
    """Number of image/video tokens the transformer of `tiny_pipeline(family)` attends over per row.

    For the video families the tiny models keep the real models' factors (VAE 8x spatial, 4x temporal,
    2x2 patches), so tokens = ((num_frames - 1) // 4 + 1) * (height // 16) * (width // 16): e.g.
    num_frames=61, height=width=512 gives 16 * 32 * 32 = 16,384 tokens (with `output_type="latent"`
    to skip decoding). UNet families have tokens at several resolutions and raise ValueError.
    """
    kwargs = tiny_call_kwargs(family, **overrides)
    if family not in _PATCH_PIXELS:
        raise ValueError(
            f"video_tokens is defined for transformer families {tuple(_PATCH_PIXELS)}, not {family!r}"
        )
    per_token = _PATCH_PIXELS[family]
    frames = (kwargs["num_frames"] - 1) // _TEMPORAL.get(family, 4) + 1 if family in VIDEO_FAMILIES else 1
    return frames * (kwargs["height"] // per_token) * (kwargs["width"] // per_token)


def add_tiny_ip_adapter(pipe: Any, seed: int = 0, image_size: int = 32) -> Any:
    """Load an untrained tiny IP-Adapter into a tiny SD / SDXL pipeline, through diffusers' own
    `load_ip_adapter`: a CLIP vision encoder with projection and its image processor, the
    adapter's image projection (4 tokens) and `to_k_ip` / `to_v_ip` in every cross-attention layer.
    Returns the pipeline; `pipe(prompt, ip_adapter_image=...)` then runs as with a real adapter."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = pipe.unet
    cross, embed_dim, tokens = unet.config.cross_attention_dim, 32, 4
    with _private_rng():
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=image_size,
                patch_size=8,
                projection_dim=embed_dim,
            )
        ).eval()
        processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)
        g = torch.Generator().manual_seed(seed)
        image_proj = {
            "proj.weight": torch.randn(cross * tokens, embed_dim, generator=g) * 0.2,
            "proj.bias": torch.zeros(cross * tokens),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        }
        # diffusers numbers the adapter's layers 1, 3, 5, ... over the cross-attention processors
        widths = {"mid_block": unet.config.block_out_channels[-1]}
        layers = {}
        key_id = 1
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            parts = name.split(".")
            if parts[0] == "mid_block":
                width = widths["mid_block"]
            elif parts[0] == "up_blocks":
                width = list(reversed(unet.config.block_out_channels))[int(parts[1])]
            else:
                width = unet.config.block_out_channels[int(parts[1])]
            for kind in ("to_k_ip", "to_v_ip"):
                layers[f"{key_id}.{kind}.weight"] = torch.randn(width, cross, generator=g) * cross**-0.5
            key_id += 2
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    pipe.load_ip_adapter({"image_proj": image_proj, "ip_adapter": layers}, subfolder="", weight_name="")
    return pipe


def hunyuan_prompt_template() -> dict[str, Any]:
    """HunyuanVideo's default prompt template with `crop_start` measured for the tiny Llama tokenizer.

    The pipeline's default `crop_start=95` counts real Llama-3 tokens (BOS and the template before the
    prompt); the tiny tokenizer splits the template differently, so the tiny call passes its own count.
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    return {"template": template, "crop_start": _template_crop_start(template)}


@functools.lru_cache(maxsize=8)
def _template_crop_start(template: str) -> int:
    tokenizer = build_llama_tokenizer(default_corpus())
    return len(tokenizer(template.partition("{}")[0])["input_ids"])


_BUILDING = threading.Lock()


@contextlib.contextmanager
def _private_rng(device: str | torch.device | None = None) -> Iterator[None]:
    """The random stream of one build: diffusers and transformers modules initialise their weights
    from torch's global generator (they take no generator), so the builders seed it per component;
    the lock keeps builds in other threads from drawing from it meanwhile (two threads building at
    once get the same weights as one), and the caller's stream is restored afterwards (the CPU's,
    and that of the CUDA `device` where weights are drawn there)."""
    device = torch.device(device or "cpu")
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with _BUILDING, torch.random.fork_rng(devices=cuda):
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Modules built inside create their floating-point weights in `dtype` (None: unchanged)."""
    saved = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


# Pixels per transformer token side: VAE downsampling x patch size.
_PATCH_PIXELS = {
    "sd3": 4,
    "flux": 4,
    "wan": 16,
    "cogvideox": 16,
    "hunyuanvideo": 16,
    "sana": 2,
    "lumina2": 16,
    "cogview4": 4,
    "pixart": 4,
    "auraflow": 4,
    "hidream": 4,
    "chroma": 4,
    "flux2": 4,
    "qwenimage": 4,
    "zimage": 4,
    "wanvace": 16,
    "skyreelsv2": 16,
    "ltx": 4,  # the tiny VAE compresses 4x (the real one 32x with 1x1 patches)
    "mochi": 16,
    "hunyuanvideo15": 16,
    "kandinsky5": 16,
    "qwenimage21": 16,  # the pipeline's fixed vae_scale_factor; latents unpatched
    "ltx2": 2,  # the tiny VAE compresses 2x (the real one 32x with 1x1 patches)
}
# Frames per latent frame of the video VAEs (default 4): (num_frames - 1) // factor + 1 latent frames.
_TEMPORAL = {"mochi": 6, "ltx2": 2}

_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "sd": {"num_inference_steps": 2, "guidance_scale": 7.5, "height": 32, "width": 32, "output_type": "pt"},
    "sdxl": {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 32, "width": 32, "output_type": "pt"},
    "sd3": {
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "height": 32,
        "width": 32,
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "flux": {
        "num_inference_steps": 2,
        "guidance_scale": 3.5,
        "height": 32,
        "width": 32,
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "wan": {
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "cogvideox": {
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "height": 32,
        "width": 32,
        "num_frames": 9,  # 3 latent frames; CogVideoX's VAE decodes 1 + 4k frames from odd latent counts
        # CogVideoX's transformer adds a joint position embedding sized for exactly this many text tokens.
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "hunyuanvideo": {
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "sana": {
        "num_inference_steps": 2,
        "guidance_scale": 4.5,
        "height": 32,
        "width": 32,
        "max_sequence_length": 32,
        # the default maps the size to the nearest 1024 px aspect-ratio bin (a 512x512 latent here)
        "use_resolution_binning": False,
        "output_type": "pt",
    },
    "lumina2": {
        "num_inference_steps": 2,
        "guidance_scale": 4.0,
        # the pipeline assumes an 8x VAE (vae_scale_factor = 8); 8x8 tokens, the least that
        # Attention Regulation's maps need
        "height": 128,
        "width": 128,
        "max_sequence_length": 64,
        "output_type": "pt",
    },
    "cogview4": {
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "height": 32,
        "width": 32,
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "pixart": {
        "num_inference_steps": 2,
        "guidance_scale": 4.5,
        "height": 32,
        "width": 32,
        "max_sequence_length": 32,
        # the default maps the size to the nearest 1024-px aspect-ratio bin (262,144 tokens)
        "use_resolution_binning": False,
        "output_type": "pt",
    },
    "auraflow": {
        "num_inference_steps": 2,
        "guidance_scale": 3.5,
        "height": 32,
        "width": 32,
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "hidream": {
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "height": 32,  # the pipeline rescales to the area of a (default_sample_size * vae factor)^2 image
        "width": 32,
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "chroma": {
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "height": 32,
        "width": 32,
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "flux2": {
        "num_inference_steps": 2,
        "guidance_scale": 4.0,
        "height": 32,
        "width": 32,
        "max_sequence_length": 64,  # the chat-templated system message takes the first 34 tokens
        "output_type": "pt",
    },
    "qwenimage": {
        "num_inference_steps": 2,
        "negative_prompt": " ",  # true CFG: a forward of the prompt, then one of the negative prompt
        "true_cfg_scale": 4.0,
        "height": 32,
        "width": 32,
        "output_type": "pt",
    },
    "zimage": {
        "num_inference_steps": 2,
        "guidance_scale": 3.0,  # CFG: one batch of [prompt's row, negative prompt's row]
        "height": 32,
        "width": 32,
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "ltx": {
        "num_inference_steps": 2,
        "guidance_scale": 3.0,  # CFG: one batch of [uncond, cond]
        "height": 32,
        "width": 32,
        "num_frames": 9,  # 3 latent frames of 8x8 tokens
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "mochi": {
        "num_inference_steps": 2,
        "guidance_scale": 4.5,  # CFG: one batch of [uncond, cond], one kernel call per row
        "height": 128,  # 8x8 tokens, the least that Attention Regulation's maps need
        "width": 128,
        "num_frames": 7,  # 2 latent frames (6x temporal VAE)
        "max_sequence_length": 32,
        "output_type": "pt",
    },
    "hunyuanvideo15": {  # CFG: the pipeline's guider (guidance_scale 6.0) runs the prompt, then the negative
        "num_inference_steps": 2,
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "output_type": "pt",
    },
    "kandinsky5": {  # CFG: a forward of the prompt, then one of the (default) negative prompt
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "max_sequence_length": 64,  # the default negative prompt whole
        "output_type": "pt",
    },
    "qwenimage21": {
        "num_inference_steps": 2,
        "negative_prompt": " ",  # true CFG: a forward of the prompt, then one of the negative prompt
        "true_cfg_scale": 4.0,
        "height": 128,  # the VAE factor is 16: 8x8 tokens (Attention Regulation needs 8x8 maps)
        "width": 128,
        "output_type": "pt",
    },
    "ltx2": {  # CFG: one batch of [uncond, cond] (cache_context "cond_uncond")
        "num_inference_steps": 2,
        "guidance_scale": 3.0,
        # no STG and no modality-isolation forwards (on by default: extra forwards per step)
        "stg_scale": 0.0,
        "audio_stg_scale": 0.0,
        "modality_scale": 1.0,
        "audio_modality_scale": 1.0,
        "height": 32,  # 16x16 tokens (pipeline: a multiple of 32)
        "width": 32,
        "num_frames": 5,  # 3 latent frames
        "frame_rate": 25.0,
        "max_sequence_length": 16,  # a multiple of the tiny connectors' 8 registers
        "output_type": "pt",
    },
}

_CALL_KWARGS["wanvace"] = dict(_CALL_KWARGS["wan"])  # no control video: zeros, every pixel to generate

_CALL_KWARGS["skyreelsv2"] = {**_CALL_KWARGS["wan"], "guidance_scale": 6.0}

_COG_TEXT_LEN = _CALL_KWARGS["cogvideox"]["max_sequence_length"]


def _clip_text_config(tokenizer: CLIPTokenizer, hidden: int = 32, projection: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-05,
        hidden_act="gelu",
        projection_dim=projection,
        max_position_embeddings=tokenizer.model_max_length,
    )


def _t5_encoder(tokenizer: T5Tokenizer, seed: int, d_model: int = 32, umt5: bool = False) -> Any:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _unet_family(seed: int, xl: bool) -> Any:
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer(default_corpus())
    unet_kwargs: dict[str, Any] = {}
    if xl:
        # SDXL conditions on both CLIP encoders' hidden states (32 + 32) and on pooled + time ids.
        unet_kwargs = dict(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64 if xl else 32,
        **unet_kwargs,
    )
    vae = _small_vae(seed, scaling_factor=0.18215, shift_factor=None)
    config = _clip_text_config(tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config).eval()
    if not xl:
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(default_corpus()),
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )


def _build_sd(seed: int) -> Any:
    return _unet_family(seed, xl=False)


def _build_sdxl(seed: int) -> Any:
    return _unet_family(seed, xl=True)


def _small_vae(seed: int, scaling_factor: float = 1.5035, shift_factor: float | None = 0.0609) -> Any:
    """A 2x-downsampling image VAE with 4 latent channels (SD3/Flux-style scaling by default)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def _build_sd3(seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    clip = build_clip_tokenizer(default_corpus())
    t5 = build_t5_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        # CLIP-L + CLIP-G hidden states (32 + 32) are padded to the T5 width, as 768 + 1280 -> 4096.
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    )
    config = _clip_text_config(clip)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(config).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_small_vae(seed),
        text_encoder=text_encoder,
        tokenizer=clip,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(default_corpus()),
        text_encoder_3=_t5_encoder(t5, seed, d_model=64),
        tokenizer_3=t5,
    )


def _build_flux(seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip = build_clip_tokenizer(default_corpus())
    t5 = build_t5_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # FLUX.1-dev style distilled guidance
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(clip)).eval()
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_small_vae(seed),
        text_encoder=text_encoder,
        tokenizer=clip,
        text_encoder_2=_t5_encoder(t5, seed),
        tokenizer_2=t5,
        image_encoder=None,
        feature_extractor=None,
    )


def _build_wan(seed: int) -> Any:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    t5 = build_t5_tokenizer(default_corpus())
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,  # room for large latent grids in memory benchmarks
    )
    return WanPipeline(
        tokenizer=t5,
        text_encoder=_t5_encoder(t5, seed, umt5=True),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _build_wanvace(seed: int) -> Any:
    """Wan's tiny model with a VACE control branch on both blocks (96 control channels: 2 x 16
    latent channels of the inactive and reactive video, 8 x 8 mask channels of the 8x VAE)."""
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    wan = _build_wan(seed)
    torch.manual_seed(seed)
    transformer = WanVACETransformer3DModel(
        **{k: v for k, v in wan.transformer.config.items() if not k.startswith("_")},
        vace_layers=[0, 1],
        vace_in_channels=96,
    )
    parts = {k: getattr(wan, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    return WanVACEPipeline(**parts, transformer=transformer)


def _build_skyreelsv2(seed: int) -> Any:
    """Wan's tiny sizes in SkyReels-V2's transformer, with the T2V scheduler (UniPC, flow shift 8)."""
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    wan = _build_wan(seed)
    torch.manual_seed(seed)
    config = {k: v for k, v in wan.transformer.config.items() if not k.startswith("_")}
    transformer = SkyReelsV2Transformer3DModel(**config)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
    )
    parts = {k: getattr(wan, k) for k in ("tokenizer", "text_encoder", "vae")}
    return SkyReelsV2Pipeline(**parts, transformer=transformer, scheduler=scheduler)


def _build_cogvideox(seed: int) -> Any:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
        DDIMScheduler,
    )

    t5 = build_t5_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=2,
        sample_width=4,
        sample_height=4,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=_COG_TEXT_LEN,
    )
    torch.manual_seed(seed)
    blocks = 4  # 8x spatial compression as in the real model
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * blocks,
        up_block_types=("CogVideoXUpBlock3D",) * blocks,
        block_out_channels=(8,) * blocks,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=t5,
        text_encoder=_t5_encoder(t5, seed),
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def _build_hunyuanvideo(seed: int) -> Any:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    llama = build_llama_tokenizer(default_corpus())
    clip = build_clip_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,  # as the real model: 16 pixels per token side
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    llama_config = LlamaConfig(
        vocab_size=len(llama),
        bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id,
        pad_token_id=llama.pad_token_id,
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,  # the pipeline reads the hidden state two layers from the top
        hidden_act="gelu",
        max_position_embeddings=1024,
    )
    torch.manual_seed(seed)
    text_encoder = LlamaModel(llama_config).eval()
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModel(_clip_text_config(clip, hidden=8)).eval()
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=llama,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip,
    )


def _build_sana(seed: int) -> Any:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    gemma = build_gemma_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderDC(  # 2x downsampling, 4 latent channels
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    config = Gemma2Config(
        head_dim=16,
        hidden_size=8,
        intermediate_size=64,
        max_position_embeddings=8192,
        num_attention_heads=2,
        num_hidden_layers=1,
        num_key_value_heads=2,
        vocab_size=len(gemma),
        pad_token_id=gemma.pad_token_id,
        eos_token_id=gemma.eos_token_id,
        bos_token_id=gemma.bos_token_id,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(config).eval()
    return SanaPipeline(
        tokenizer=gemma,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _build_lumina2(seed: int) -> Any:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        Lumina2Pipeline,
        Lumina2Transformer2DModel,
    )
    from transformers import GemmaConfig, GemmaForCausalLM

    gemma = build_gemma_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,  # grouped-query attention, as the real model (24 heads, 8 key/value heads)
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(4, 2, 2),
        cap_feat_dim=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(  # 8x downsampling: Lumina2Pipeline hard-codes vae_scale_factor = 8
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    config = GemmaConfig(
        head_dim=2,
        hidden_size=8,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,  # the pipeline reads the second-to-last hidden state
        num_key_value_heads=4,
        vocab_size=len(gemma),
        pad_token_id=gemma.pad_token_id,
        eos_token_id=gemma.eos_token_id,
        bos_token_id=gemma.bos_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = GemmaForCausalLM(config).eval()
    return Lumina2Pipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=gemma,
    )


def _build_cogview4(seed: int) -> Any:
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    glm = build_glm_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
    )
    config = GlmConfig(
        hidden_size=32,
        intermediate_size=8,
        num_hidden_layers=2,  # the pipeline reads the second-to-last hidden state
        num_attention_heads=4,
        head_dim=8,
        vocab_size=len(glm),
        pad_token_id=glm.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = GlmModel(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    return CogView4Pipeline(
        tokenizer=glm,
        text_encoder=text_encoder,
        vae=_small_vae(seed, scaling_factor=1.0, shift_factor=None),
        transformer=transformer,
        scheduler=scheduler,
    )


def _build_pixart(seed: int) -> Any:
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    t5 = build_t5_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(  # diffusers' PixArt-Sigma fast test, 16x16 latent
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        tokenizer=t5,
        text_encoder=_t5_encoder(t5, seed),
        vae=_small_vae(seed, scaling_factor=0.13025, shift_factor=None),
        transformer=transformer.eval(),
        scheduler=DDIMScheduler(),
    )


def _build_auraflow(seed: int) -> Any:
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    t5 = build_t5_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(  # diffusers' AuraFlow fast test, in 2 heads of 16
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        # the same width as the test's 4 heads of 8, so that one head of the untrained model moves
        # the image measurably (SoftPAG on one head)
        attention_head_dim=16,
        num_attention_heads=2,
        caption_projection_dim=32,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=256,
    )
    return AuraFlowPipeline(
        tokenizer=t5,
        text_encoder=_t5_encoder(t5, seed, umt5=True),  # AuraFlow's Pile-T5 is a UMT5 encoder
        vae=_small_vae(seed, scaling_factor=0.13025, shift_factor=None),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _build_hidream(seed: int) -> Any:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
    )
    from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM

    clip = build_clip_tokenizer(default_corpus())
    t5 = build_t5_tokenizer(default_corpus())
    llama = build_llama_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(  # diffusers' HiDream fast test
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[32, 16],  # T5, Llama widths
        text_emb_dim=64,  # pooled CLIP-L + CLIP-G
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        llama_layers=(0, 1),
    ).eval()  # in training mode it unpatchifies differently (and adds the MoE's auxiliary loss)
    config = _clip_text_config(clip)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(config).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    llama_config = LlamaConfig(
        vocab_size=len(llama),
        bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id,
        pad_token_id=llama.pad_token_id,
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,  # one hidden state per entry of llama_layers
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    text_encoder_4 = LlamaForCausalLM(llama_config).eval()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_small_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=clip,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(default_corpus()),
        text_encoder_3=_t5_encoder(t5, seed),
        tokenizer_3=t5,
        text_encoder_4=text_encoder_4,
        tokenizer_4=llama,
        transformer=transformer,
    )
    # The pipeline rescales every requested size to the area of a (default_sample_size * vae scale
    # factor)^2 image, 256^2 px with the tiny 2x VAE (64x64 tokens); 16 makes it 32^2 px (8x8 tokens).
    # An attribute, not configuration: set again after `from_pretrained`.
    pipe.default_sample_size = 16
    return pipe


def _build_chroma(seed: int) -> Any:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    t5 = build_t5_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2, as FLUX
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    )
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_small_vae(seed),
        text_encoder=_t5_encoder(t5, seed),
        tokenizer=t5,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _build_flux2(seed: int) -> Any:
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = build_mistral_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,  # 1 latent channel patchified 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,  # hidden states of text-encoder layers 10, 20 and 30 (16 each), stacked
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
    )
    special = tokenizer.convert_tokens_to_ids
    ids = dict(
        bos_token_id=special("<s>"), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 37,
            "max_position_embeddings": 512,
            "num_attention_heads": 4,
            "num_hidden_layers": 30,  # the pipeline reads layers 10, 20 and 30
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1e9,
            "sliding_window": None,
            **ids,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=special("[IMG]"),
        **ids,
    )
    torch.manual_seed(seed)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
    )


def _qwen25_vl(tokenizer: Any, seed: int) -> Any:
    """A tiny Qwen2.5-VL (text and vision towers) for the tiny Qwen tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    special = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "bos_token_id": None,
            "eos_token_id": special("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        hidden_size=16,
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=special("<|im_end|>"),
        vision_start_token_id=special("<|vision_start|>"),
        vision_end_token_id=special("<|vision_end|>"),
        vision_token_id=special("<|image_pad|>"),
        image_token_id=special("<|image_pad|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _build_qwenimage(seed: int) -> Any:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels packed 2x2
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(  # 2x spatial: an 8x8 token grid at 32 px
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    text_encoder = _qwen25_vl(tokenizer, seed)
    return QwenImagePipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def _build_zimage(seed: int) -> Any:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # the pad tokens are created with torch.empty
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,  # the pipeline reads the hidden state one layer from the top
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_small_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _build_ltx(seed: int) -> Any:
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    t5 = build_t5_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(  # diffusers' fast-test VAE: 4x spatial and temporal compression
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(t5, seed),
        tokenizer=t5,
        transformer=transformer,
    )


def _build_mochi(seed: int) -> Any:
    from diffusers import (
        AutoencoderKLMochi,
        FlowMatchEulerDiscreteScheduler,
        MochiPipeline,
        MochiTransformer3DModel,
    )

    t5 = build_t5_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(  # diffusers' fast-test sizes
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=32,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=_CALL_KWARGS["mochi"]["max_sequence_length"],
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLMochi(  # 8x spatial, 6x temporal, as the real VAE
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    )
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(t5, seed),
        tokenizer=t5,
        transformer=transformer,
    )


def _build_hunyuanvideo15(seed: int) -> Any:
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        T5Config,
        T5EncoderModel,
    )

    from ..families.hunyuanvideo15 import qwen_template

    tokenizer, byt5 = build_qwen_tokenizer(), ByT5Tokenizer()  # ByT5: bytes, no vocabulary file
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,  # latent (4) + condition latent (4) + condition mask (1)
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,  # as the real model: a 16x VAE, 1x1 patches
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=32,
        task_type="t2v",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
    )
    special = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=3,  # the pipeline reads the hidden state two layers from the top
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            bos_token_id=None,
            eos_token_id=special("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            max_position_embeddings=2048,
        )
    ).eval()
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(byt5),
            d_model=8,
            d_kv=4,
            d_ff=16,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=byt5.pad_token_id,
            eos_token_id=byt5.eos_token_id,
            decoder_start_token_id=byt5.pad_token_id,
        )
    ).eval()
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=byt5,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    # The released crop (108) counts the real Qwen tokens of the [system, user] template before the
    # prompt; the tiny tokenizer spells that part in more, so the tiny pipeline crops its own count.
    head = qwen_template(pipe).partition("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(head)["input_ids"])
    return pipe


def _build_kandinsky5(seed: int) -> Any:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        Kandinsky5T2VPipeline,
        Kandinsky5Transformer3DModel,
    )
    from transformers import CLIPTextModel

    tokenizer, clip = build_qwen_tokenizer(), build_clip_tokenizer(default_corpus())
    torch.manual_seed(seed)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        in_text_dim=16,
        in_text_dim2=8,
        time_dim=16,
        out_visual_dim=4,
        patch_size=(1, 2, 2),  # as the real model: 16 pixels per token side
        model_dim=16,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(2, 2, 4),  # head dim 8: 2 heads
    )
    with torch.no_grad():  # modulations start at zero (every block's gates shut): untrained weights
        for module in transformer.modules():
            if type(module).__name__ == "Kandinsky5Modulation":
                module.out_layer.reset_parameters()
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    text_encoder = _qwen25_vl(tokenizer, seed)
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModel(_clip_text_config(clip, hidden=8)).eval()
    pipe = Kandinsky5T2VPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    # The released crop (128) counts the real Qwen tokens of the template before the prompt; the tiny
    # tokenizer spells that part in more, so the tiny pipeline crops its own count.
    head = pipe.prompt_template.partition("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(head)["input_ids"])
    return pipe


def _build_qwenimage21(seed: int) -> Any:
    from unittest import mock

    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    tokenizer = build_qwen_tokenizer()
    # Without torchvision, transformers cannot look up the video processor's class to check the
    # arguments; text-to-image never reads the video processor, so there is none.
    with mock.patch.object(Qwen3VLProcessor, "check_argument_for_proper_class", lambda _, __, arg: type(arg)):
        processor = Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessorPil(),
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=tokenizer.chat_template,
        )
    special = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "vocab_size": len(tokenizer),
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "mrope_interleaved": True},
            "rope_theta": 1000000.0,
            "bos_token_id": None,
            "eos_token_id": special("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=special("<|image_pad|>"),
        video_token_id=special("<|video_pad|>"),
        vision_start_token_id=special("<|vision_start|>"),
        vision_end_token_id=special("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    text_encoder = Qwen3VLForConditionalGeneration(config).eval()
    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=16,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage21(  # 16x spatial, as the pipeline assumes: an 8x8 token grid at 128 px
        base_dim=4,
        decoder_base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False] * 4,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        processor=processor,
        transformer=transformer,
    )


def _build_ltx2(seed: int) -> Any:
    """diffusers' fast-test LTX-2 components, with a Gemma 3 built in code and the connectors'
    learnable registers on (8), as in LTX-2's checkpoints (the fast tests turn them off)."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    gemma = build_gemma_tokenizer(default_corpus())
    gemma.padding_side = "left"  # what LTX2Pipeline sets before encoding
    text_config = Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=64,
        max_position_embeddings=512,
        vocab_size=len(gemma),
        pad_token_id=gemma.pad_token_id,
        eos_token_id=gemma.eos_token_id,
        bos_token_id=gemma.bos_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    config = Gemma3Config(
        text_config=text_config, vision_config=vision, mm_tokens_per_image=4, image_token_index=len(gemma) - 1
    )
    torch.manual_seed(seed)
    text_encoder = Gemma3ForConditionalGeneration(config).eval()
    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=32,
        rope_double_precision=False,
        rope_type="split",
    )
    torch.manual_seed(seed)
    connector = {
        "num_attention_heads": 4,
        "attention_head_dim": 8,
        "num_layers": 1,
        "num_learnable_registers": 8,
    }
    connectors = LTX2TextConnectors(
        caption_channels=32,
        text_proj_in_factor=text_config.num_hidden_layers + 1,
        **{f"{m}_connector_{k}": v for m in ("video", "audio") for k, v in connector.items()},
        connector_rope_base_seq_len=32,
        rope_double_precision=False,
        rope_type="split",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(  # 2x spatial and temporal compression
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        layers_per_block=(1,),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    torch.manual_seed(seed)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    torch.manual_seed(seed)
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=gemma,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )


_BUILDERS = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "wan": _build_wan,
    "cogvideox": _build_cogvideox,
    "hunyuanvideo": _build_hunyuanvideo,
    "sana": _build_sana,
    "lumina2": _build_lumina2,
    "cogview4": _build_cogview4,
    "pixart": _build_pixart,
    "auraflow": _build_auraflow,
    "hidream": _build_hidream,
    "chroma": _build_chroma,
    "flux2": _build_flux2,
    "qwenimage": _build_qwenimage,
    "zimage": _build_zimage,
    "wanvace": _build_wanvace,
    "skyreelsv2": _build_skyreelsv2,
    "ltx": _build_ltx,
    "mochi": _build_mochi,
    "hunyuanvideo15": _build_hunyuanvideo15,
    "kandinsky5": _build_kandinsky5,
    "qwenimage21": _build_qwenimage21,
    "ltx2": _build_ltx2,
}
