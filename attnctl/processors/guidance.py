"""Latent guidance: Attend-and-Excite (Chefer et al. 2023) and A-STAR (Agarwal et al. 2023).

Before a guided denoising step, a conditional-only forward with gradients reads the cross-attention
maps of the concept words, a loss is taken on them and the latent moves: z_t <- z_t - a_t grad_z L.
The step then denoises the updated latent. No denoising loop is copied: a denoiser wrapper makes the
update at the step's first forward and feeds the updated latent to every forward of that step, and
the scheduler's `step` (wrapped on the instance) steps from the updated latent too.

Each image is guided on its own, as in the authors' per-image loop: its losses, its number of
updates and its retention masks are its own, so an image comes out the same alone and in any batch
(the images still updating share one gradient forward). That forward ends at the last layer whose
map the loss reads: nothing after it changes the loss, so this early exit is exact, and the rest of
the denoiser (on SD, the high-resolution up blocks) is neither run nor back-propagated. Of that last
layer only the maps are computed, not its attention output; and the denoiser's weights are taken out
of autograd for the gradient forward, since the gradient is w.r.t. the latent alone (both exact:
the same kernels compute the same loss and gradient).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint

from ..core.attention import AttentionCall, AttentionEdit, overrides
from ..core.controls import Control, _in_range, check, param
from ..core.denoiser import DenoiserWrapper, latent_input, take_rows
from ..core.layers import WorkingLayers, one_grid
from ..core.session import PerGeneration, in_steps
from ..families.base import LayerInfo
from ..kernels.memory import release_free_memory
from .guidance_math import (
    REFINEMENT_MAX_ITERS,
    REFINEMENT_THRESHOLDS,
    astar_loss,
    binarize,
    excite_loss,
    normalize_concept_maps,
    step_sizes,
)

# The text columns the softmax of 100 x attention runs over (`softmax_over`).
SOFTMAX_OVER = ("auto", "context", "prompt")
# "auto": the authors' choice per model. Their code (`normalize_eot`, on for SD 2.1 only) takes the
# full context on SD 1.x; every other model gets the prompt's tokens (see resolve_softmax_over).
AUTO_SOFTMAX = {"sd1": "context"}
# Models whose text keys are one CLIP sequence with the start token at 0: where "context" is defined.
CONTEXT_VARIANTS = ("sd1", "sd2", "sdxl")
# On a model that attends at one token grid (a DiT) the maps are read, by default, in the text-attending
# layers of the first half of its blocks: layout and semantics form there, finer detail later (Li et
# al. 2026, "Unraveling MMDiT Blocks"), and the gradient forward ends at the last of them, so an update
# runs and differentiates through half of the denoiser. A stated default, not tuned on real weights.
DIT_DEPTH = 0.5


# The fields Attend-and-Excite and A-STAR share (one definition, one help text).
def _layers() -> Any:
    return param(
        None,
        kind="layers",
        optional=True,
        help="Layer paths or block indices (None: the cross-attention level at latent/4, else the "
        "lowest above it: 16x16 on SD at 512 px, 32x32 on SDXL at 1024 px; on a DiT the text-attending "
        "layers of its first half of blocks).",
    )


def _guided_fraction() -> Any:
    return param(0.5, low=0, high=1, help="Guide the first fraction of the steps (reference: 25 of 50).")


def _scale() -> Any:
    return param(20.0, low=0, help="Step size: a_i = scale * sqrt(linspace(1, 0.5)) over the guided steps.")


def _smooth() -> Any:
    return param(True, help="Gaussian-smooth the maps before the loss (3x3, sigma 0.5).")


def _occurrence() -> Any:
    return param(0, help="Which occurrence of a repeated word (0: the first, -1: the last).")


def _softmax_over() -> Any:
    return param(
        "auto",
        choices=SOFTMAX_OVER,
        help="Text columns of the loss's softmax: context (start token to the last key, SD 1.x), "
        "prompt (the prompt's tokens, SD 2.1), auto (the authors' choice per model).",
    )


@dataclasses.dataclass
class AttendAndExcite(Control):
    """Attend-and-Excite: push each token's strongest map pixel up, L = max_k (1 - max A_k).

    tokens: the subject words. layers: None = `working_layers`, the cross-attention level at
    latent/4, else the lowest above it (16x16 on SD at 512 px, 32x32 on SDXL at 1024 px); on a DiT
    the text-attending layers of its first half of blocks (`DIT_DEPTH`).
    guided_fraction: guide the first fraction of the steps (reference: 25 of 50).
    scale: step size a_i = scale*sqrt(linspace(1, .5)).
    thresholds: iterative refinement {step: T} for a 50-step run (scaled to the run's step count):
    at these steps the latent is refined towards L <= 1 - T before the regular update (`_more_updates`).
    max_refinement: refinement updates per step at most (0: no refinement).
    softmax_over: the text columns the softmax of 100 x attention runs over: "context" (every text
    key between the start token and the last key, the end token and padding included: the authors'
    loss on SD 1.x), "prompt" (the prompt's own tokens: their `normalize_eot`, used on SD 2.1) or
    "auto" (the authors' choice per model, `resolve_softmax_over`). The default thresholds are the
    authors', tuned on SD 1.4 with the full context, and kept by them for SD 2.1 with the prompt's
    tokens: with another choice they ask for another loss level.
    """

    tokens: list[str] = param(kind="words", default_factory=list, help="The subject words of the prompt.")
    layers: list[str | int] | None = _layers()
    guided_fraction: float = _guided_fraction()
    scale: float = _scale()
    thresholds: dict[int, float] = param(
        kind="data",
        default_factory=lambda: dict(REFINEMENT_THRESHOLDS),
        help="Refinement {step of a 50-step run: T}: refine towards L <= 1 - T there (scaled to the run).",
    )
    max_refinement: int = param(
        REFINEMENT_MAX_ITERS, low=0, high=1000, help="Refinement updates per step at most (0: none)."
    )
    smooth: bool = _smooth()
    occurrence: int = _occurrence()
    softmax_over: str = _softmax_over()

    def validate(self) -> None:
        ok = isinstance(self.thresholds, dict) and all(
            _in_range(k, True, 0, None) and _in_range(v, False, 0, 1) for k, v in self.thresholds.items()
        )
        check(ok, "thresholds", self.thresholds, "a dict {step index >= 0: threshold in [0, 1]}")

    def __post_init__(self) -> None:
        # JSON turns int keys into strings; take them back
        if isinstance(self.thresholds, dict):
            self.thresholds = {
                int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else k: v
                for k, v in self.thresholds.items()
            }
        super().__post_init__()

    def install(self, session: Any) -> None:
        _install(session, self, self.tokens)

    def _loss(self, maps: torch.Tensor, state: dict) -> torch.Tensor:
        return excite_loss(maps)

    def _more_updates(self, session: Any, losses: list[float]) -> bool:
        """Whether an image takes another update at this step, given its losses so far (one per update).

        Iterative refinement (Chefer et al. 2023, Algorithm 1) as the authors' code schedules it
        (`_perform_iterative_refinement_step`, kept in diffusers): at a refinement step whose first
        loss is above 1 - T, refinement updates repeat until one is made from a latent whose loss is
        at most 1 - T, or max_refinement were made; then the step's regular update follows, from a
        fresh forward. Other guided steps make the regular update alone.
        """
        scale = max(1, session.num_steps) / 50  # the thresholds are given for a 50-step run
        threshold = {round(k * scale): v for k, v in self.thresholds.items()}.get(session.step)
        if threshold is None or self.max_refinement == 0 or losses[0] <= 1.0 - threshold:
            return False
        met = next((k for k, loss in enumerate(losses) if loss <= 1.0 - threshold), None)
        refinements = self.max_refinement if met is None else min(self.max_refinement, met + 1)
        return len(losses) <= refinements  # the refinement updates, then the regular one


@dataclasses.dataclass
class AStar(Control):
    """A-STAR: segregate concepts' maps (pairwise soft IoU) and retain each concept's previous mask.

    concepts: the subject words. mask_threshold: retention masks keep pixels above this fraction of
    a map's range (not stated in the paper; 0.5 suggested). iterations: latent updates per guided
    step. softmax_over: as in AttendAndExcite; A-STAR reads A&E's normalised maps and has no
    published code, so "auto" takes the A&E authors' choice per model. Other fields as in
    AttendAndExcite.
    """

    concepts: list[str] = param(kind="words", default_factory=list, help="The subject words of the prompt.")
    layers: list[str | int] | None = _layers()
    guided_fraction: float = _guided_fraction()
    scale: float = _scale()
    mask_threshold: float = param(
        0.5,
        low=0,
        high=1,
        low_open=True,
        help="Retention masks keep pixels above this fraction of a map's range.",
    )
    iterations: int = param(1, low=1, high=1000, help="Latent updates per guided step.")
    smooth: bool = _smooth()
    occurrence: int = _occurrence()
    softmax_over: str = _softmax_over()

    def validate(self) -> None:
        folded = [" ".join(c.lower().split()) for c in self.concepts]
        check(
            len(set(folded)) == len(folded), "concepts", self.concepts, "distinct words (each concept once)"
        )

    def install(self, session: Any) -> None:
        _install(session, self, self.concepts)

    def _loss(self, maps: torch.Tensor, state: dict) -> torch.Tensor:
        # retention reads the masks of the previous guided step; refresh them with these maps
        loss = astar_loss(maps, state.get("masks"))
        state["next_masks"] = binarize(maps.detach(), self.mask_threshold)
        return loss

    def _more_updates(self, session: Any, losses: list[float]) -> bool:
        return len(losses) < self.iterations


def resolve_softmax_over(choice: str, session: Any) -> str:
    """The softmax columns for the session's pipeline, context or prompt: `choice`, or for "auto" the
    authors' choice.

    Chefer et al.'s code takes the full context on SD 1.4 and the prompt's tokens on SD 2.1
    (`normalize_eot`); the model comes from the family adapter's `variant` (SD 1.x: a CLIP tokenizer
    padding with its end-of-text token). SDXL and the other families get the prompt's tokens: the
    authors published no setting for them, and their text keys past the prompt are not copies of the
    end token as on SD 1.x (SDXL's second encoder pads with "!" as SD 2's does; T5 with <pad>).
    """
    variant = session.adapter.variant(session.pipe)
    resolved = AUTO_SOFTMAX.get(variant, "prompt") if choice == "auto" else choice
    if resolved == "context" and variant not in CONTEXT_VARIANTS:
        raise ValueError(
            f"softmax_over='context' is not allowed for {type(session.pipe).__name__}: its text keys are "
            "not one CLIP sequence with a start token; use 'prompt' or 'auto'"
        )
    return resolved


def _install(session: Any, spec: Any, words: list[str]) -> None:
    layers = WorkingLayers(session, spec.layers, depth=DIT_DEPTH)
    collector = _Collector(layers)
    session.add_edit(layers.candidates, collector)
    guide = _Guide(spec, words, resolve_softmax_over(spec.softmax_over, session), collector)
    session.add_wrapper(guide)
    session.generation_hooks.append(guide.reset)
    session.wrap(session.pipe.scheduler, "step", guide.wrap_step)


class _MapsRecorded(Exception):
    """Raised by a collector once the last map its loss reads is recorded: ends the gradient forward."""


class _Collector(AttentionEdit):
    """Sums head-averaged text maps of the working layers during its guide's gradient forward
    (differentiable), and ends that forward once every one of those layers is recorded."""

    def __init__(self, layers: WorkingLayers):
        self.layers = layers
        self.columns: list[int] = []
        self.recording = False
        self.replaying = False  # a checkpointed block recomputed in the backward: the same maps, unrecorded
        self.total: torch.Tensor | None = None
        self.count = 0
        self.seen: set[str] = set()

    def start(self, columns: list[int]) -> None:
        self.columns, self.total, self.count, self.seen = columns, None, 0, set()
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def active(self, session: Any, layer: LayerInfo) -> bool:
        return (self.recording or self.replaying) and self.layers.includes(session, layer)

    def kernel(self, call: AttentionCall) -> torch.Tensor | None:
        """At the last layer the loss reads only its maps are needed: record them and end the forward
        before the attention output is computed. Not where another edit changes this call's
        probabilities: they exist only after the kernel (`attend`), and `observe` reads them there."""
        if not call.cond_rows or self.replaying:  # other rows only (a processor that runs row by row)
            return None
        last = self.seen | {call.layer.name} >= self.layers.names(call.session)
        if last and not any(overrides(e, "logit_bias") or overrides(e, "post_softmax") for e in call.edits):
            self.observe(call)  # raises _MapsRecorded
        return None

    def observe(self, call: AttentionCall) -> None:
        if not call.cond_rows:
            return
        layout = call.layout
        probs = call.text_probs(self.columns)  # [images, N, C]
        maps = probs.reshape(probs.shape[0], layout.frames * layout.height, layout.width, len(self.columns))
        if self.replaying:
            return  # the recomputation needs the same operations, not another record
        if self.total is not None and maps.shape != self.total.shape:
            raise ValueError(
                f"guidance layers must share one map size; {call.layer.name} has {tuple(maps.shape[1:3])}, "
                f"others {tuple(self.total.shape[1:3])}: choose layers of one resolution"
            )
        self.total = maps if self.total is None else self.total + maps
        self.count += 1
        self.seen.add(call.layer.name)
        if self.seen >= self.layers.names(call.session):
            raise _MapsRecorded

    def mean(self) -> torch.Tensor:
        """The maps averaged over the recorded layers: [images, h, w, columns]; the record is handed
        over (the collector keeps no graph between updates)."""
        if self.total is None:
            raise RuntimeError("latent guidance recorded no attention map: no working layer ran")
        total, self.total = self.total, None
        return total / self.count


class _Guide(DenoiserWrapper):
    """Makes each guided step's latent update and feeds the updated latent to the step."""

    def __init__(self, spec: Any, words: list[str], softmax_over: str, collector: _Collector):
        self.spec, self.words, self.softmax_over, self.collector = spec, words, softmax_over, collector
        self.columns = PerGeneration(self._columns)
        self.reset(None)

    def reset(self, session: Any) -> None:
        self.step = -1
        self.delta: torch.Tensor | None = None  # latent update of the current step, per image
        self.states: list[dict] = []  # per image, e.g. A-STAR's retention masks

    def before(self, session: Any, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if session.guiding:
            return args, kwargs
        if session.step != self.step:  # the step's first forward decides its update
            self.step, self.delta = session.step, None
            guided = in_steps(session.step, session.num_steps, first=self.spec.guided_fraction)
            if guided and session.cond_rows and self.spec.scale > 0:
                self.delta = self._update(session, module, args, kwargs)
        if self.delta is None:
            return args, kwargs
        latent, put = latent_input(session, args, kwargs)
        scale = _input_scale(session)
        rows = torch.arange(latent.shape[0], device=latent.device) % self.delta.shape[0]
        return put(latent + (scale * self.delta[rows]).to(latent.dtype))

    def wrap_step(self, step: Callable) -> Callable:
        def guided_step(
            model_output: Any, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            if self.delta is not None:  # step from the updated latent, as the method prescribes
                delta = self.delta.to(sample.dtype)
                if delta.shape != sample.shape and delta.numel() == sample.numel():
                    delta = delta.reshape(sample.shape)  # Z-Image's denoiser takes [C, 1, H, W] per row
                sample = sample + delta
                self.delta = None
            return step(model_output, timestep, sample, *args, **kwargs)

        return guided_step

    def _columns(self, session: Any) -> tuple[list[int], list[tuple[list[int], list[list[int]]]]]:
        """The text columns the maps need, and per image the indices among them of its softmax
        columns and of each word's sub-tokens."""
        images = []
        for prompt in session.prompts():
            if self.softmax_over == "context":
                softmax = list(range(1, session.text_len - 1))  # the authors' [1:-1]
            else:
                softmax = session.adapter.prompt_span(session.pipe, prompt)[0]
            words = [
                session.adapter.text_positions(session.pipe, prompt, w, self.spec.occurrence)
                for w in self.words
            ]
            images.append((softmax, words))
        union = sorted({c for softmax, _ in images for c in softmax})
        index = {c: i for i, c in enumerate(union)}
        return union, [([index[c] for c in s], [[index[c] for c in w] for w in ws]) for s, ws in images]

    def _update(self, session: Any, module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """This step's update of z, one row per conditional image. Each image's own losses decide its
        updates; the images still updating share one gradient forward."""
        rows = session.cond_rows
        latent, _ = latent_input(session, args, kwargs)
        inputs = take_rows((args, kwargs), rows, session.batch, session.adapter.batch_dims)
        x0 = latent[rows].detach()
        x = x0.clone()
        scale = _input_scale(session)
        alpha = step_sizes(max(1, session.num_steps), self.spec.scale)[session.step]
        if len(self.states) != len(rows):
            self.states = [{} for _ in rows]
        losses: list[list[float]] = [[] for _ in rows]
        active = list(range(len(rows)))
        log = session.log.setdefault(type(self.spec).__name__, [])
        saved = (session.batch, session.rows, session.guiding, session.branch)
        session.guiding, session.branch = True, "cond"
        try:
            with _frozen(module):  # the gradient is w.r.t. the latent alone
                while active:
                    values, grad = self._gradient(
                        session,
                        module,
                        take_rows(inputs, active, len(rows), session.adapter.batch_dims),
                        x[active],
                        active,
                    )
                    # z <- z - a grad_z L with x = c z (the scaled model input): x <- x - a c^2 grad_x L
                    x[active] = (x[active] - alpha * scale**2 * grad.float()).to(x0.dtype)
                    if not torch.isfinite(x[active]).all():
                        raise ValueError(
                            f"{type(self.spec).__name__} made the latent non-finite at step {session.step} "
                            f"(scale={self.spec.scale}, loss {values}); lower its scale"
                        )
                    for i, value in zip(active, values, strict=True):
                        log.append(
                            {"step": session.step, "image": i, "iteration": len(losses[i]), "loss": value}
                        )
                        losses[i].append(value)
                    active = [i for i in active if self.spec._more_updates(session, losses[i])]
        finally:
            session.batch, session.rows, session.guiding, session.branch = saved
        for state in self.states:
            if "next_masks" in state:
                state["masks"] = state.pop("next_masks")
        return (x - x0) / scale

    def _gradient(
        self, session: Any, module: torch.nn.Module, inputs: tuple, x: torch.Tensor, images: list[int]
    ) -> tuple[list[float], torch.Tensor]:
        """The loss of each of `images` at latent input x (one row each), and its gradient w.r.t. x."""
        union, columns = self.columns.get(session)
        x = x.detach().requires_grad_(True)
        on_cpu = x.device.type == "cpu"
        with torch.enable_grad():
            args, kwargs = latent_input(session, *inputs)[1](x)  # a list latent's rows: views of x
            self.collector.start(union)
            try:
                with _checkpointed(session, module, self.collector, on_cpu):
                    module(*args, **kwargs)
            except _MapsRecorded:
                pass  # every map the loss reads is recorded; the rest of the denoiser cannot change it
            finally:
                self.collector.stop()
            attn = self.collector.mean()
            losses = []
            for row, i in enumerate(images):
                softmax, groups = columns[i]
                maps = normalize_concept_maps(attn[row], groups, softmax, smooth=self.spec.smooth)
                losses.append(self.spec._loss(maps, self.states[i]))
            # each loss depends on its own row of x only, so the gradient of the sum is each one's own
            if on_cpu:
                release_free_memory()  # what the forward freed, before the backward allocates again
            self.collector.replaying = True
            try:
                (grad,) = torch.autograd.grad(torch.stack(losses).sum(), x)
            finally:
                self.collector.replaying = False
        if on_cpu:
            release_free_memory()
        return [float(v) for v in losses], grad


@contextlib.contextmanager
def _checkpointed(
    session: Any, module: torch.nn.Module, collector: _Collector, on_cpu: bool
) -> Iterator[None]:
    """On a DiT, the gradient forward keeps only the inputs of the blocks before the last one it reads
    and recomputes each block in the backward (torch.utils.checkpoint), so its memory is about one
    block's activations whatever the depth, for one more forward of those blocks. Exact: the
    recomputation runs the same operations (the collector repeats its maps unrecorded). Not where an
    edit active in the gradient forward keeps state per call (`AttentionEdit.replayable`), not for a
    block with diffusers' hooks inside (`_hooked`), nor on a UNet, whose early exit leaves little to
    keep. `on_cpu`: where the gradient forward runs (there each recomputation trims the heap first)."""
    layers = session.layers
    names = collector.layers.names(session)
    if not one_grid(layers) or not names or not all(e.replayable for e in session.installed_edits()):
        yield
        return
    last = max((layer for layer in layers if layer.name in names), key=lambda layer: layer.index).block
    blocks = list(dict.fromkeys(layer.block for layer in layers))
    patched = []

    def before() -> None:  # each recomputation in the backward starts on a trimmed heap
        if on_cpu and collector.replaying:
            release_free_memory()

    for path in blocks[: blocks.index(last)]:
        block = module.get_submodule(path)
        if isinstance(block, (torch.nn.ModuleList, torch.nn.ModuleDict)) or _hooked(block):
            continue
        own = block.__dict__.get("forward")  # a forward set on the instance (diffusers' hooks), else None
        block.forward = _checkpoint_call(block.forward, before)
        patched.append((block, own))
    try:
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own


def _hooked(block: torch.nn.Module) -> bool:
    """Whether diffusers' hooks act inside the block (caches, offload): they count or move per call,
    and a recomputation would call them again."""
    return any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None) for m in block.modules())


def _checkpoint_call(forward: Callable, before: Callable[[], None]) -> Callable:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:  # the forward, and in the backward its recomputation
        before()
        return forward(*args, **kwargs)

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpointed


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """The module's weights out of autograd, and back as they were on exit.

    Weights that require grad make autograd record and keep, in every gradient forward, what their
    own gradients would need, which nothing reads (about 5% of a gradient forward and backward on
    the testbed); the same kernels run either way, so the loss and its gradient are unchanged.
    """
    weights = [p for p in module.parameters() if p.requires_grad]
    for p in weights:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in weights:
            p.requires_grad_(True)


def _input_scale(session: Any) -> float:
    """c in x = c z: the scheduler's model-input scaling at this step (1 for DDIM and flow matching).

    The gradient forward takes x, the input the denoiser gets at this step, so the maps it reads are
    the step's own. diffusers' A&E pipeline feeds z unscaled there, which on Euler and LMS
    (c = 1/sqrt(sigma^2 + 1)) shows the UNet a latent it never gets while sampling.
    """
    scale_input = getattr(session.pipe.scheduler, "scale_model_input", None)
    if scale_input is None or session.timestep is None:
        return 1.0
    return float(scale_input(torch.ones(1), torch.tensor(session.timestep)).flatten()[0])
