"""What a model-family adapter provides. Adapters are the only model-specific code in attnctl.

An adapter knows, for one family of denoisers:
- which attention modules exist and their kind (self / cross / joint),
- how an attention module's processor turns hidden states into q, k, v (after norms and RoPE) and how
  the attention output becomes the module's output again (`prepare` → `Prepared.finish`),
- where text and image/video tokens sit in the attention sequence and their spatial grid,
- which tokenizer produced the text sequence the denoiser sees (prompt words → text positions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

KINDS = ("self", "cross", "joint")


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One attention module of a denoiser."""

    name: str  # module path, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    kind: str  # "self" | "cross" | "joint"
    heads: int
    block: str  # the enclosing block's path, e.g. "up_blocks.1" or "transformer_blocks.3"
    index: int  # position of the module among all attention modules, in model order
    downsample: int = 1  # token-grid downsampling of this layer relative to the denoiser input grid


@dataclasses.dataclass
class Layout:
    """Where tokens sit in one attention call (sequence positions along dim 2 of q/k/v [B, H, S, D])."""

    image_q: slice  # image/video queries
    image_k: slice  # image/video keys (empty slice for cross-attention)
    text_k: slice | None  # text keys (None: this call has no text keys, e.g. UNet self-attention)
    frames: int
    height: int
    width: int
    # The denoiser batch rows this kernel call holds, where a processor calls the kernel row by row
    # (Mochi: one call per row, each with that row's unpadded text); None: every row, in order.
    rows: tuple[int, ...] | None = None

    @property
    def image_tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclasses.dataclass
class ImageStream:
    """One IP-Adapter's decoupled image-prompt cross-attention in a layer (Ye et al., "IP-Adapter",
    arXiv 2308.06721): out += scale * softmax(Q K_ipᵀ/√d) V_ip with K_ip = to_k(states), V_ip = to_v(states)."""

    states: torch.Tensor  # projected image embeddings [B, T, C], or [B, n_images, T, C]
    to_k: torch.nn.Module
    to_v: torch.nn.Module
    scale: float | list[float]  # one per image when a list
    mask: torch.Tensor | None = None  # diffusers' `ip_adapter_masks` entry [1, n_images, H, W]

    @property
    def images(self) -> int:
        return self.states.shape[1] if self.states.dim() == 4 else 1

    def keys_values(self, heads: int, image: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K_ip, V_ip [B, H, T, D] of one image (None: every image's tokens together, as diffusers
        attends to them without masks)."""
        states = self.states if image is None or self.states.dim() == 3 else self.states[:, image]
        batch = states.shape[0]
        key, value = self.to_k(states), self.to_v(states)
        head_dim = key.shape[-1] // heads
        return (x.reshape(batch, -1, heads, head_dim).transpose(1, 2) for x in (key, value))


@dataclasses.dataclass
class Prepared:
    """q, k, v of one attention call, shaped [B, H, S, D], and how to finish the module's forward."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    layout: Layout
    finish: Callable[[torch.Tensor], Any]  # attention output [B, H, Sq, D] -> module output
    mask: torch.Tensor | None = None  # additive or boolean mask broadcastable to [B, H, Sq, Sk]
    scale: float | None = None  # None: 1/sqrt(D)
    # IP-Adapter streams `finish` adds to the attention output, as the replaced processor did; an
    # edit that adds them its own way (Layout) takes them out of this list.
    image_streams: list[ImageStream] = dataclasses.field(default_factory=list)


class FamilyAdapter:
    """Base adapter; subclasses fill in the family-specific parts.

    `session` arguments are attnctl's live session; adapters read or set only `grid`, `text_len`,
    `denoisers` and `adapters` on it (typed Any: families sit below the session and never import it).
    """

    name: str = ""  # short name: `tiny:<name>`, the support matrix
    title: str = ""  # the models it covers, as people name them
    # Denoiser class names this adapter accepts (names, so that optional classes need no import),
    # and the processor class names a denoiser of another name must use throughout to be accepted.
    denoisers: tuple[str, ...] = ()
    processors: tuple[str, ...] = ()
    latent_arg = "hidden_states"  # the denoiser's keyword for its latent input
    timestep_arg = "timestep"  # and for its timestep
    # Keyword arguments of the denoiser whose batch is not their first dimension (HiDream's stacked
    # Llama states [layers, B, L, C]: 1), for controls that take or add batch rows.
    batch_dims: dict[str, int] = {}  # noqa: RUF012 - read only
    video = False  # whether the denoiser makes videos (frames > 1 in the token grid)
    # Where attnctl takes q, k, v: at the kernel call inside the model's own processor, "dispatch"
    # (diffusers' dispatch_attention_fn) or "sdpa" (F.scaled_dot_product_attention), placed by
    # `seam_layout`; None: through `prepare`, which re-does the processor's work.
    seam: str | None = None
    # Methods (control kinds) that would apply to the family but attnctl cannot do on it, with why.
    refuses: dict[str, str] = {}  # noqa: RUF012 - read only
    # How the family's pipelines run classifier-free guidance where they do not name the branch of
    # a denoiser call (diffusers' `cache_context("cond"/"uncond")`): `cfg_batch`, the order of the
    # halves of a batch that stacks both branches (diffusers' usual [uncond, cond]); `cfg_forwards`,
    # the branches of separate forwards at one step, in the order the pipeline makes them (empty:
    # it stacks them).
    cfg_batch: tuple[str, str] = ("uncond", "cond")
    cfg_forwards: tuple[str, ...] = ()

    def layers(self, denoiser: torch.nn.Module) -> list[LayerInfo]:
        """Every attention module of the denoiser, in model order."""
        raise NotImplementedError

    def observe_forward(self, session: Any, inputs: dict[str, Any]) -> None:
        """Read the token grid from a denoiser call's arguments (by parameter name).

        Called before each denoiser forward; sets `session.grid` (frames, height, width of the
        image tokens at full token resolution). The session itself reads the timestep, the batch
        and the text length (`encoder_hidden_states`)."""
        raise NotImplementedError

    def seam_layout(
        self, session: Any, layer: LayerInfo, call: int, queries: int, keys: int
    ) -> Layout | None:
        """Where the tokens sit in kernel call number `call` (0, 1, ...) of one processor call of
        `layer`, whose q and k hold `queries` and `keys` tokens; None: a call no control sees (it runs
        as the model made it, e.g. Wan I2V's attention to the image embedding)."""
        raise NotImplementedError

    def prepare(
        self,
        session: Any,
        layer: LayerInfo,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Prepared:
        """Do the replaced processor's work up to the attention kernel; return q, k, v and a finisher.

        Receives exactly the arguments the attention module passed to its processor, and the
        replaced processor itself as the keyword `processor` (IP-Adapter weights live there)."""
        raise NotImplementedError

    def append_text(self, kwargs: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
        """The denoiser call's keyword arguments with `tokens` [B, R, C] (encoded prompts) appended to
        its text sequence, after the prompt's own tokens (e.g. a Layout's region prompts); an
        `encoder_attention_mask` is extended to keep them."""
        text, mask = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        if text is None:
            raise ValueError(
                f"{type(self).__name__}: the denoiser was called without encoder_hidden_states as a "
                "keyword argument; attnctl appends region prompts there"
            )
        out = {**kwargs, "encoder_hidden_states": torch.cat([text, tokens.to(text)], dim=1)}
        if mask is not None:  # a key mask [B, L] (1: keep; Sana's, PixArt's padding) or a bias [B, 1, L]
            if mask.dim() not in (2, 3):
                raise ValueError(
                    f"{type(self).__name__}: attnctl extends an encoder_attention_mask of [batch, text] or "
                    f"[batch, 1, text] for appended tokens; got one of shape {tuple(mask.shape)}"
                )
            keep = mask.new_zeros if mask.dim() == 3 else mask.new_ones
            out["encoder_attention_mask"] = torch.cat([mask, keep(*mask.shape[:-1], tokens.shape[1])], -1)
        return out

    def cfg_scale(self, pipe: Any) -> float:
        """w of the pipeline's guidance written as ε_u + w·(ε_c − ε_u); default its `guidance_scale`."""
        return float(pipe.guidance_scale)

    def image_prompt_adapters(self, denoiser: torch.nn.Module) -> int:
        """How many IP-Adapters are loaded into the denoiser (0: none, or not supported)."""
        return 0

    def with_image_embeds(self, kwargs: dict[str, Any], embeds: torch.Tensor) -> dict[str, Any]:
        """The denoiser call's keyword arguments with IP-Adapter image embeddings [B, n_images, D]."""
        raise NotImplementedError(f"attnctl gives IP-Adapter images to UNet pipelines only, not {self.name}")

    def kernel_for(self, processor: Any) -> Callable:
        """The attention kernel the model itself would use in this layer: f(q, k, v, mask, scale).

        Default: PyTorch SDPA on [B, H, S, D], what diffusers' UNet, SD3 and CogVideoX processors call."""
        return sdpa

    def text_positions(self, pipe: Any, prompt: str, word: str, occurrence: int = 0) -> list[int]:
        """Positions of `word` in the text-key sequence the denoiser sees for `prompt`."""
        raise NotImplementedError

    def prompt_span(self, pipe: Any, prompt: str) -> tuple[list[int], list[int]]:
        """(positions of the prompt's own tokens, positions of its start/end-of-text tokens) in the
        text-key sequence; padding is in neither."""
        raise NotImplementedError(f"{type(self).__name__} does not give prompt spans yet")

    def gives_prompt_spans(self) -> bool:
        return type(self).prompt_span is not FamilyAdapter.prompt_span

    def variant(self, pipe: Any) -> str:
        """Which model of the family the pipeline holds, where published settings differ between them
        (e.g. "sd1", "sd2", "sdxl"); default: the family name."""
        return self.name


def attention_modules(
    denoiser: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]] | None = None
) -> dict[str, torch.nn.Module]:
    """Every attention module of a denoiser (one with a processor), by path, in model order. Not
    `attn_processors`: some diffusers transformers (Lumina2, CogView4, Z-Image) do not have it, and
    some attention modules (Mochi's) no `set_processor` either, only a processor attribute.
    `modules`: the denoiser's `named_modules()`, where the caller has walked them already."""
    return {
        name: m for name, m in (denoiser.named_modules() if modules is None else modules) if _has_processor(m)
    }


def attention_layers(
    denoiser: torch.nn.Module, kind_of: Callable[[str, torch.nn.Module], str | None], heads: str = "heads"
) -> list[LayerInfo]:
    """The layers of a denoiser: its attention modules (`attention_modules`) to which `kind_of(path,
    module)` gives a kind, numbered in model order; None leaves a module out. `heads`: the modules'
    attribute holding their head count."""
    kinds = ((path, module, kind_of(path, module)) for path, module in attention_modules(denoiser).items())
    kept = [(path, module, kind) for path, module, kind in kinds if kind is not None]
    return [LayerInfo(p, kind, getattr(m, heads), block_of(p), i) for i, (p, m, kind) in enumerate(kept)]


def _has_processor(module: torch.nn.Module) -> bool:
    # Most modules have no processor: tell without getattr, whose miss on a module goes through
    # nn.Module.__getattr__ and an exception. A processor is an attribute, a submodule (processors
    # that are nn.Modules) or something of the class (a property).
    if not (
        "processor" in vars(module) or "processor" in module._modules or hasattr(type(module), "processor")
    ):
        return False
    processor = getattr(module, "processor", None)
    if processor is None:
        return False
    return callable(getattr(module, "set_processor", None)) or (
        callable(processor) and "Processor" in type(processor).__name__
    )


def set_processor(module: torch.nn.Module, processor: Any) -> None:
    """Give an attention module a processor: its `set_processor`, else the attribute it reads."""
    if callable(getattr(module, "set_processor", None)):
        module.set_processor(processor)
    else:
        module.processor = processor


def block_of(name: str) -> str:
    """The block a module belongs to: the first two path parts ("up_blocks.1", "transformer_blocks.3")."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def grid_for(tokens: int, height: int, width: int) -> tuple[int, int]:
    """Token grid (h, w) of a feature map downsampled from a (height, width) grid to `tokens` cells.

    Downsampling by 2 rounds up (convolutions with padding 1 and stride 2), so try factors 1, 2, 4, ...
    """
    factor = 1
    while factor <= max(height, width):
        h, w = -(-height // factor), -(-width // factor)
        if h * w == tokens:
            return h, w
        factor *= 2
    raise ValueError(f"cannot place {tokens} tokens on a grid downsampled from {height}x{width}")


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """PyTorch SDPA on [B, H, S, D]: the kernel of the processors that call it directly."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
