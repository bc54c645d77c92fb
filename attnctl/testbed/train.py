"""Trainer for the bundled shapes model: a standard `StableDiffusionPipeline` learned from scratch on CPU.

Two stages, each resumable from its own checkpoint:
1. `AutoencoderKL` (factor 2: 32 px images <-> 4x16x16 latents), MSE + a small KL term.
2. `UNet2DConditionModel` (cross-attention at 16x16 and 8x8) jointly with a `CLIPTextModel`
   (`text_layers` causal layers, 0 by default: embeddings and the final norm only), epsilon
   prediction under a `DDPMScheduler`, min-SNR-5 loss weighting (Hang et al. 2023, "Efficient
   Diffusion Training via Min-SNR Weighting Strategy"), 10% caption dropout for classifier-free
   guidance, EMA weights for the saved model. With `ground_weight` > 0 (0.1 by default) a token
   grounding term is added (Wang et al. 2024, "TokenCompose", its token loss): for every colour and
   shape word, the share of its cross-attention (mean over heads, every text-attending layer) that
   falls outside its object's drawn pixels, squared. The renderer knows each object's mask, so the
   supervision is exact.
Batches and noise are drawn from generators seeded by (seed, step), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import CAPTION_WORDS, IMAGE_SIZE, generate

TOKEN_LENGTH = 16


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run."""

    seed: int = 0
    n_train: int = 30_000
    vae_steps: int = 200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    unet_steps: int = 6_000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    min_snr_gamma: float = 5.0
    unet_channels: tuple[int, ...] = (32, 64)
    # Which UNet levels (full latent resolution first) have attention layers; the mid block always does.
    attention_levels: tuple[bool, ...] = (True, True)
    layers_per_block: int = 1
    text_width: int = 64
    # 0: the text states are token + position embeddings after the final norm (non-contextual), so
    # a word's state cannot carry the rest of the prompt and the conditioning runs through the words.
    text_layers: int = 0
    # Weight of the token grounding loss (0: off); see the module docstring.
    ground_weight: float = 0.1
    checkpoint_every: int = 100
    log_every: int = 25

    @classmethod
    def smoke(cls) -> TrainConfig:
        """A run of a few seconds that exercises every stage (for tests)."""
        return replace(
            cls(),
            n_train=64,
            vae_steps=4,
            vae_batch=8,
            unet_steps=4,
            unet_batch=8,
            warmup=2,
            checkpoint_every=2,
            log_every=1,
        )


def train(out_dir: str | Path, config: TrainConfig | None = None, threads: int | None = 2) -> Path:
    """Train (or resume) into `out_dir`; returns the saved pipeline folder `out_dir/model`."""
    from diffusers import DDPMScheduler

    config = config or TrainConfig()
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    _log(f"config: {asdict(config)}")

    t0 = time.time()
    samples = generate(config.seed, config.n_train)
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    captions = [s.caption for s in samples]
    grounding = word_masks(samples) if config.ground_weight > 0 else None
    _log(f"rendered {len(samples)} samples in {time.time() - t0:.1f}s")

    tokenizer = build_tokenizer(CAPTION_WORDS)
    vae = train_vae(images, config, out / "checkpoints" / "vae.pt")
    latents_mean, latents_std = _encode_all(
        vae, images, out / "checkpoints" / f"latents-vae{config.vae_steps}.pt"
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )
    unet, text_encoder = train_unet(
        latents_mean * vae.config.scaling_factor,
        latents_std * vae.config.scaling_factor,
        captions,
        tokenizer,
        scheduler,
        config,
        out / "checkpoints" / "unet.pt",
        grounding,
    )
    return save_pipeline(out / "model", vae, unet, text_encoder, tokenizer, scheduler)


def build_tokenizer(words: Iterable[str]):
    """A CLIPTokenizer built offline (`attnctl.tiny`) in which every caption word is a single token."""
    from attnctl.tiny import build_clip_tokenizer

    words = list(words)
    # The shared factory makes a word one token once it is seen twice.
    tokenizer = build_clip_tokenizer(words * 2)
    tokenizer.model_max_length = TOKEN_LENGTH
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"caption word {word!r} splits into {len(ids)} tokens")
    return tokenizer


def build_vae():
    """AutoencoderKL with one downsampling: 3x32x32 <-> 4x16x16."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_unet(config: TrainConfig):
    """UNet whose `attention_levels` (and mid block) have self- and cross-attention.

    The default attends to text at 8x8 only (the second level and the mid block): latent/2 of the
    16x16 latent, the coarsest level, where the cross-attention maps localise words.
    """
    from diffusers import UNet2DConditionModel

    if len(config.attention_levels) != len(config.unet_channels):
        raise ValueError(
            f"attention_levels={config.attention_levels} needs one entry per UNet level {config.unet_channels}"
        )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.unet_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_width,
        # diffusers' legacy name: this is the number of heads per level (head dim 16 here).
        attention_head_dim=tuple(c // 16 for c in config.unet_channels),
        norm_num_groups=16,
    )


def build_text_encoder(tokenizer, config: TrainConfig):
    """A real CLIPTextModel sized for the caption vocabulary (`text_layers` causal transformer layers)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=TOKEN_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def train_vae(images: torch.Tensor, config: TrainConfig, ckpt: Path):
    """Stage 1; sets `scaling_factor` so that scaled latents have unit std."""
    torch.manual_seed(config.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = _load_checkpoint(ckpt, vae, opt)
    vae.train()
    clock = _Progress("vae", start, config.vae_steps, config.log_every)
    for step in range(start, config.vae_steps):
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        idx = torch.randint(len(images), (config.vae_batch,), generator=gen)
        x = images[idx].float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + config.kl_weight * posterior.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock.tick(step, loss.item())
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps:
            _save_checkpoint(ckpt, vae, opt, step + 1)
    vae.eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(config.seed)
        idx = torch.randint(len(images), (min(1024, len(images)),), generator=gen)
        mean = vae.encode(images[idx].float() / 127.5 - 1).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
        x = images[idx[:256]].float() / 127.5 - 1
        err = (vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) - x).abs().mul(127.5)
    _log(
        f"vae: scaling_factor={vae.config.scaling_factor:.4f} recon mean|err|={err.mean():.2f}/255 max={err.amax():.0f}"
    )
    return vae


def word_masks(samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, each object's pixel coverage on the 16x16 latent grid and each token's object.

    Returns (masks, owner): masks (N, 3, 16, 16) float, the fraction of each latent cell's pixels the
    object covers; owner (N, TOKEN_LENGTH) long, the object a token's word names (its colour or its
    shape word) or -1. Captions are "a <colour> <shape> and a ...": word 4j+1 and 4j+2 name object j,
    token = word + 1 (the start token comes first; every caption word is one token).
    """
    side = IMAGE_SIZE // 2
    masks = torch.zeros(len(samples), 3, side, side)
    owner = torch.full((len(samples), TOKEN_LENGTH), -1, dtype=torch.long)
    for i, sample in enumerate(samples):
        drawn = torch.from_numpy(sample.masks).float()
        masks[i, : len(drawn)] = F.avg_pool2d(drawn[:, None], 2)[:, 0]
        for j in range(len(sample.objects)):
            owner[i, 4 * j + 2 : 4 * j + 4] = j
    return masks, owner


class _MapRecorder:
    """Cross-attention processor that keeps each call's probabilities (mean over heads) for the loss.

    The same arithmetic as diffusers' plain `AttnProcessor` on a transformer block's `attn2` (no
    residual, no norms inside the attention, 3-D inputs), with the probabilities made explicit.
    """

    def __init__(self):
        self.maps: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, queries, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        self.maps.append(probs.view(batch, attn.heads, queries, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def grounding_loss(maps: list[torch.Tensor], masks: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Mean over layers and named words of (1 - word's attention share inside its object)^2.

    maps: (B, queries, tokens) per layer; masks (B, 3, 16, 16) coverage; owner (B, tokens), -1 = none.
    """
    named = owner >= 0
    if not named.any():
        return maps[0].new_zeros(())
    losses = []
    for probs in maps:
        side = int(round(probs.shape[1] ** 0.5))
        cover = F.adaptive_avg_pool2d(masks, side).flatten(2)  # (B, 3, queries)
        word_cover = torch.gather(cover, 1, owner.clamp(min=0)[..., None].expand(-1, -1, cover.shape[2]))
        share = probs / probs.sum(1, keepdim=True).clamp_min(1e-12)  # over queries, per token
        inside = (share.transpose(1, 2) * word_cover).sum(-1)  # (B, tokens)
        losses.append(((1 - inside) ** 2)[named].mean())
    return torch.stack(losses).mean()


def train_unet(
    latents_mean,
    latents_std,
    captions,
    tokenizer,
    scheduler,
    config: TrainConfig,
    ckpt: Path,
    grounding: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Stage 2: UNet and text encoder together; returns their EMA copies.

    `grounding` is `word_masks(samples)`, needed when `config.ground_weight` > 0.
    """
    torch.manual_seed(config.seed + 1)
    unet = build_unet(config)
    recorder = None
    if config.ground_weight > 0:
        if grounding is None:
            raise ValueError("ground_weight > 0 needs the samples' word masks (word_masks)")
        recorder = _MapRecorder()
        own_processors = unet.attn_processors
        unet.set_attn_processor(
            {
                name: recorder if name.endswith("attn2.processor") else proc
                for name, proc in own_processors.items()
            }
        )
    text_encoder = build_text_encoder(tokenizer, config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    start = _load_checkpoint(ckpt, unet, opt, text_encoder=text_encoder, ema=ema)
    n_params = sum(p.numel() for p in unet.parameters())
    _log(
        f"unet: {n_params / 1e6:.2f}M params, text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M"
    )

    # Tokenise once; the empty caption is the unconditional input used for guidance.
    tokens = _tokenize(tokenizer, captions)
    empty = _tokenize(tokenizer, [""])[0]
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=config.min_snr_gamma) / snr

    unet.train()
    text_encoder.train()
    clock = _Progress("unet", start, config.unet_steps, config.log_every)
    for step in range(start, config.unet_steps):
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + 500_000 + step)
        idx = torch.randint(len(latents_mean), (config.unet_batch,), generator=gen)
        z0 = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)
        ids = tokens[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < config.caption_dropout
        ids[drop] = empty
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        cond = text_encoder(ids).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = (weights[t] * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        if recorder is not None:
            masks, owner = grounding
            owner = owner[idx].masked_fill(drop[:, None], -1)
            ground = grounding_loss(recorder.maps, masks[idx], owner)
            loss = loss + config.ground_weight * ground
            recorder.maps.clear()
            ground = ground.item()
        for group in opt.param_groups:
            group["lr"] = _lr(step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        clock.tick(step, loss.item(), **({"ground": ground} if recorder is not None else {}))
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.unet_steps:
            _save_checkpoint(ckpt, unet, opt, step + 1, text_encoder=text_encoder, ema=ema)
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    if recorder is not None:
        unet.set_attn_processor(own_processors)
    return unet.eval(), text_encoder.eval()


def save_pipeline(path: Path, vae, unet, text_encoder, tokenizer, train_scheduler) -> Path:
    """Write a `StableDiffusionPipeline` (safetensors, fp32) with a DPM-Solver++ sampling scheduler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(train_scheduler.config, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _log(f"saved pipeline to {path}")
    return path


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def _encode_all(
    vae, images: torch.Tensor, cache: Path, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image, cached beside the VAE checkpoint."""
    if cache.exists():
        return torch.load(cache)
    t0 = time.time()
    means, stds = [], []
    for i in range(0, len(images), chunk):
        dist = vae.encode(images[i : i + chunk].float() / 127.5 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    latents = torch.cat(means), torch.cat(stds)
    torch.save(latents, cache)
    _log(f"encoded {len(images)} latents in {time.time() - t0:.0f}s")
    return latents


def _lr(step: int, config: TrainConfig) -> float:
    # Linear warm-up, then constant: with EMA weights a run can be stopped (and exported with a
    # smaller `unet_steps`) at any checkpoint without a schedule that assumed a different end.
    return config.unet_lr * min(1.0, (step + 1) / config.warmup)


def _save_checkpoint(path: Path, model, opt, step: int, text_encoder=None, ema=None) -> None:
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict()}
    if text_encoder is not None:
        state["text_encoder"] = text_encoder.state_dict()
    if ema is not None:
        state["ema"] = ema
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save keeps the previous checkpoint


def _load_checkpoint(path: Path, model, opt, text_encoder=None, ema=None) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if text_encoder is not None:
        text_encoder.load_state_dict(state["text_encoder"])
    if ema is not None:
        for e, saved in zip(ema, state["ema"], strict=True):
            e.copy_(saved)
    _log(f"resumed {path.name} at step {state['step']}")
    return state["step"]


class _Progress:
    def __init__(self, name: str, start: int, total: int, every: int):
        self.name, self.start, self.total, self.every = name, start, total, every
        self.t0 = time.time()
        self.losses: dict[str, list[float]] = {}

    def tick(self, step: int, loss: float, **parts: float) -> None:
        """Record a step's loss (and named parts of it); log their means every `every` steps."""
        for key, value in {"loss": loss, **parts}.items():
            self.losses.setdefault(key, []).append(value)
        done = step + 1
        if done % self.every == 0 or done == self.total:
            rate = (time.time() - self.t0) / max(1, done - self.start)
            means = " ".join(f"{key} {np.mean(values):.4f}" for key, values in self.losses.items())
            _log(
                f"{self.name} step {done}/{self.total} {means} "
                f"{rate:.2f}s/step eta {rate * (self.total - done) / 60:.1f}min"
            )
            self.losses = {}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
