"""Attention Regulation (Zhang et al., ECCV 2024) as a control and as a plain diffusers processor.

Per guided layer and step, the conditional rows' cross-attention logits of the target words get an
optimised Gaussian-basis bias (`regulation_math.regulate_logits`), so that no token dominates. No
latent update and no UNet backward pass; the unconditional rows are left bit-identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..core.attention import AttentionCall, AttentionEdit, attend
from ..core.controls import Control, check, check_number, check_words, param
from ..core.denoiser import BatchRows
from ..core.layers import WorkingLayers, working_layers
from ..core.session import PerGeneration, in_steps
from ..families.base import LayerInfo, sdpa
from ..families.unet import UNetAdapter
from .regulation_math import (
    MEAN_WEIGHT,
    MIN_SIDE,
    QUANTILE_WEIGHT,
    WEIGHT_DECAY,
    RegulationState,
    regulation_bias,
    regulation_supported,
)


@dataclasses.dataclass
class AttentionRegulation(Control):
    """Regulate cross-attention of `targets` (words or phrases of the prompt) so no token dominates.

    Defaults are the reference code's (steps 0-24 of 50 edited, 20 gradient steps per layer)."""

    targets: list[str] = param(
        kind="words", default_factory=list, help="Words or phrases of the prompt to regulate."
    )
    layers: list[str | int] | None = param(
        None,
        kind="layers",
        optional=True,
        help="Layer paths or block indices (None: the cross-attention level at latent/4, else the "
        "lowest above it with maps of at least 8 per side: up_blocks.1 and down_blocks.2 of SD at 512 px).",
    )
    edit_fraction: float = param(
        0.5,
        low=0,
        high=1,
        low_open=True,
        help="Edit the first fraction of the steps (reference: 0-24 of 50).",
    )
    iterations: int = param(20, low=1, high=1000, help="Gradient steps on the logit bias per layer and step.")
    lr: float = param(100.0, low=0, low_open=True, help="Step size: w <- w - (rows * lr) grad.")
    smoothing: float = param(
        0.25, low=0, high=1, help="D = smoothing * D_prev + (1 - smoothing) * D_best between steps."
    )
    decay: float = param(0.99, low=0, high=1, low_open=True, help="The bias is scaled by decay^step.")
    quantile_weight: float = param(QUANTILE_WEIGHT, low=0, help="Weight of the 90th-percentile term.")
    mean_weight: float = param(MEAN_WEIGHT, low=0, help="Weight of the mean-attention term.")
    weight_decay: float = param(WEIGHT_DECAY, low=0, help="Weight of the bias's L2 penalty.")
    occurrence: int = param(0, help="Which occurrence of a repeated word (0: the first, -1: the last).")
    seed: int = param(0, low=0, help="Seed of the Gaussian bumps' initialisation.")

    def install(self, session: Any) -> None:
        layers = WorkingLayers(session, self.layers, min_side=MIN_SIDE)
        edit = _Regulator(self, layers, self._columns)
        session.add_edit(layers.candidates, edit)
        session.generation_hooks.append(edit.reset)

    def _columns(self, session: Any) -> tuple[list[list[int]], list[list[int]]]:
        """Per conditional image: the target columns and the start/end-of-text columns."""
        targets, restore = [], []
        for prompt in session.prompts():
            cols = {
                c
                for w in self.targets
                for c in session.adapter.text_positions(session.pipe, prompt, w, self.occurrence)
            }
            targets.append(sorted(cols))
            restore.append(session.adapter.prompt_span(session.pipe, prompt)[1])
        return targets, restore


class _Regulator(AttentionEdit):
    replayable = False  # each call optimises the layer's weights from where the last one left them

    def __init__(self, spec: AttentionRegulation, layers: WorkingLayers | None, columns: Callable):
        self.spec = spec
        self.layers = layers  # None: the plain processor, which decides per call itself
        self.columns = PerGeneration(columns)  # (target columns, restore columns) per image
        self.states: dict[str, RegulationState] = {}

    def reset(self, session: Any) -> None:
        """Forget the optimised weights of every layer (a new generation starts)."""
        self.states.clear()

    def active(self, session: Any, layer: LayerInfo) -> bool:
        editing = bool(session.cond_rows) and in_steps(
            session.step, session.num_steps, first=self.spec.edit_fraction
        )
        return editing and self.layers.includes(session, layer)

    def logit_bias(self, call: AttentionCall, logits: torch.Tensor) -> torch.Tensor:
        targets, _ = self.columns.get(call.session)
        layout = call.layout
        edited = logits  # the call's own: biased in place, image by image after its optimisation
        for i in range(logits.shape[0]):  # one conditional image at a time: its own target columns
            state = self.states.setdefault(f"{call.layer.name}/{i}", RegulationState(seed=self.spec.seed))
            state.step = call.session.step
            info = regulation_bias(
                logits[i],
                targets[i],
                height=layout.frames * layout.height,  # video: frames stacked (as A&E, A-STAR)
                width=layout.width,
                state=state,
                steps=self.spec.iterations,
                lr=self.spec.lr,
                smoothing=self.spec.smoothing,
                decay=self.spec.decay,
                quantile_weight=self.spec.quantile_weight,
                mean_weight=self.spec.mean_weight,
                weight_decay=self.spec.weight_decay,
            )
            cols = torch.tensor(targets[i], device=logits.device)
            bias = info.bias.to(logits.dtype).reshape(logits.shape[1], layout.image_tokens, len(cols))
            edited[i].index_add_(-1, cols, bias)
            if hasattr(call.session, "log"):
                call.session.log.setdefault("AttentionRegulation", []).append(
                    {
                        "layer": call.layer.name,
                        "step": call.session.step,
                        "image": i,
                        "first_loss": float(info.losses[0]),
                        "best_loss": float(info.best_losses[-1]),
                    }
                )
        return edited

    def post_softmax(self, call: AttentionCall, probs: torch.Tensor, unedited: torch.Tensor) -> torch.Tensor:
        # AR puts the start/end-of-text columns back to their unedited probabilities (rows then no
        # longer sum to 1): part of the method, reproduced as published.
        _, restore = self.columns.get(call.session)
        for i, cols in enumerate(restore):
            probs[i, ..., cols] = unedited[i, ..., cols]
        return probs


class AttentionRegulationProcessor:
    """Attention Regulation as a plain diffusers processor for UNet pipelines, usable without control().

        proc = AttentionRegulationProcessor.for_prompt(pipe, "a cat and a frog", ["cat", "frog"])
        pipe.unet.set_attn_processor({name: proc if name in proc.layer_names else AttnProcessor2_0()
                                      for name in pipe.unet.attn_processors})

    Without control() it cannot see the pipeline, so it assumes diffusers' CFG batch layout
    ([uncond, cond] halves when `guidance=True`), a square latent unless `height`/`width` are given,
    and counts its own calls per layer to know the step (one call per layer per step). Self-attention
    and layers it does not edit run plain SDPA. Call `reset()` between generations.
    """

    def __init__(
        self,
        targets: list[int],
        restore_columns: list[int],
        *,
        num_steps: int,
        latent_size: tuple[int, int] | None = None,
        guidance: bool = True,
        layer_names: list[str] | None = None,
        **options: Any,
    ):
        check(
            bool(targets) and all(isinstance(t, int) and t >= 0 for t in targets),
            "targets",
            targets,
            "token columns >= 0",
        )
        check_number("num_steps", num_steps, low=1, integer=True)
        self.spec = AttentionRegulation(targets=["_"], **options)  # validates the options
        self.targets, self.restore = list(targets), list(restore_columns)
        self.num_steps, self.latent_size, self.guidance = num_steps, latent_size, guidance
        self.layer_names = layer_names
        self.reset()

    @classmethod
    def for_prompt(
        cls,
        pipe: Any,
        prompt: str,
        targets: list[str],
        *,
        num_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        occurrence: int = 0,
        **options: Any,
    ) -> AttentionRegulationProcessor:
        """Build from words: token columns from the pipeline's tokenizer, layers by the working-side rule."""
        check_words("targets", targets)
        adapter = UNetAdapter()
        cols = sorted({c for w in targets for c in adapter.text_positions(pipe, prompt, w, occurrence)})
        factor = getattr(pipe, "vae_scale_factor", 8)
        size = pipe.unet.config.sample_size * factor
        latent = ((height or size) // factor, (width or size) // factor)
        chosen = working_layers(adapter.layers(pipe.unet), *latent, min_side=MIN_SIDE)
        return cls(
            cols, adapter.prompt_span(pipe, prompt)[1], num_steps=num_steps, latent_size=latent,
            layer_names=[f"{layer.name}.processor" for layer in chosen], **options,
        )  # fmt: skip

    def reset(self) -> None:
        """Start over, as for a new generation: the per-layer call counts and optimised weights go."""
        self._calls: dict[int, int] = {}
        self._edit = _Regulator(self.spec, None, self._fixed_columns)

    def _fixed_columns(self, state: Any) -> tuple[list[list[int]], list[list[int]]]:
        n = len(state.rows.cond)
        return [self.targets] * n, [self.restore] * n

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        cross = encoder_hidden_states is not None
        step = self._calls.get(id(attn), 0)
        self._calls[id(attn)] = step + cross
        batch = hidden_states.shape[0]
        n = (
            hidden_states.shape[1]
            if hidden_states.ndim == 3
            else hidden_states.shape[-2] * hidden_states.shape[-1]
        )
        state = _State(
            grid=(1, *(self.latent_size or (round(n**0.5),) * 2)),
            rows=BatchRows.of_batch(batch, None, self.guidance),
            step=step,
        )
        layer = LayerInfo(str(id(attn)), "cross" if cross else "self", attn.heads, "", 0)
        prepared = UNetAdapter().prepare(
            state, layer, attn, hidden_states, encoder_hidden_states, attention_mask, temb
        )
        lay = prepared.layout
        edit = (
            cross
            and in_steps(step, self.num_steps, first=self.spec.edit_fraction)
            and regulation_supported(lay.height, lay.width)
        )
        return prepared.finish(
            attend(AttentionCall(state, layer, prepared, sdpa), [self._edit] if edit else [])
        )


@dataclasses.dataclass
class _State:
    """The session facts the processor needs, derived from the call itself."""

    grid: tuple[int, int, int]
    rows: BatchRows
    step: int
    generation: int = 0  # one generation until reset(), which starts a fresh edit
