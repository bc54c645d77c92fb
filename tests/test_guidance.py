"""Attend-and-Excite and A-STAR latent guidance through control(): the spec's checks on pipelines."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
from diffusers import EulerDiscreteScheduler

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.core.controls import Control
from attnctl.core.tokens import token_positions
from attnctl.families.unet import UNetAdapter
from attnctl.processors import guidance
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


def _run(pipe, family="sd", **overrides):
    kwargs = tiny_call_kwargs(family, **{"num_inference_steps": 4, **overrides})
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


class _Forwards:
    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(lambda *a: setattr(self, "count", self.count + 1))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize(
    "control",
    [attnctl.AttendAndExcite(["cat", "frog"], scale=0.0), attnctl.AStar(["cat", "frog"], scale=0.0)],
)
def test_disabled_guidance_equals_baseline(pipe, control):
    base = _run(pipe)
    with attnctl.control(pipe, control):
        out = _run(pipe)
    assert torch.equal(out, base)


@pytest.mark.parametrize(
    "control", [attnctl.AttendAndExcite(["cat", "frog"], max_refinement=0), attnctl.AStar(["cat", "frog"])]
)
def test_gradient_forward_only_on_guided_steps(pipe, control):
    counter = _Forwards(pipe.unet)
    try:
        _run(pipe)
        plain = counter.count
        counter.count = 0
        with attnctl.control(pipe, control) as ctl:
            out = _run(pipe)
    finally:
        counter.close()
    log = ctl.log[type(control).__name__]
    assert sorted({e["step"] for e in log}) == [0, 1]  # guided_fraction 0.5 of 4 steps
    assert counter.count == plain + len(log)  # one conditional gradient forward per update, nothing else
    assert torch.isfinite(out).all()


def test_excite_refinement_lowers_the_loss(pipe):
    # thresholds at step 0 that are never met: 20 refinement updates at step 0, then one per step
    with attnctl.control(
        pipe, attnctl.AttendAndExcite(["cat", "frog"], thresholds={0: 1.0}, max_refinement=5)
    ) as ctl:
        _run(pipe)
    step0 = [e["loss"] for e in ctl.log["AttendAndExcite"] if e["step"] == 0]
    assert len(step0) == 6
    assert step0[-1] < step0[0]


def test_astar_retention_uses_previous_masks(pipe):
    with attnctl.control(pipe, attnctl.AStar(["cat", "frog"])) as ctl:
        _run(pipe)
    first, second = ctl.log["AStar"][:2]
    # no masks at the first guided step: segregation only (<= 1/2 for one pair); then + retention (>= 1/2 each)
    assert first["loss"] <= 0.5 + 1e-6
    assert second["loss"] >= 1.0 - 1e-6


def test_guidance_with_euler_scheduler_and_maps(pipe):
    euler = tiny_pipeline("sd")
    euler.scheduler = EulerDiscreteScheduler.from_config(euler.scheduler.config)
    with attnctl.control(euler, attnctl.AStar(["cat", "frog"]), attnctl.AttentionMaps(["cat"])) as ctl:
        out = _run(euler)
    assert torch.isfinite(out).all() and ctl.maps["cat"].dim() == 2
    assert "step" not in vars(euler.scheduler)


def test_sdxl_and_half_precision():
    sdxl = tiny_pipeline("sdxl")
    with attnctl.control(sdxl, attnctl.AStar(["cat", "frog"])) as ctl:
        out = _run(sdxl, "sdxl")
    assert torch.isfinite(out).all() and ctl.log["AStar"]
    half = tiny_pipeline("sd").to(dtype=torch.bfloat16)
    with attnctl.control(half, attnctl.AttendAndExcite(["cat", "frog"], max_refinement=0)) as ctl:
        out = _run(half)
    assert torch.isfinite(out.float()).all() and ctl.log["AttendAndExcite"]


def test_restored_after_exception(pipe):
    def boom(*args):
        raise RuntimeError("boom")

    procs = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with attnctl.control(pipe, attnctl.AStar(["cat", "frog"])):
            _run(pipe, callback_on_step_end=boom)
    assert "step" not in vars(pipe.scheduler) and "forward" not in vars(pipe.unet)
    assert all(pipe.unet.attn_processors[k] is v for k, v in procs.items())


def test_controls_round_trip_and_validate():
    for c in (
        attnctl.AttendAndExcite(["cat"], thresholds={0: 0.1, 5: 0.5}),
        attnctl.AStar(["cat", "frog"], mask_threshold=0.4),
    ):
        assert Control.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="^tokens="):
        attnctl.AttendAndExcite([])
    with pytest.raises(ValueError, match="^thresholds="):
        attnctl.AttendAndExcite(["cat"], thresholds={0: 2.0})
    with pytest.raises(ValueError, match="^mask_threshold="):
        attnctl.AStar(["cat", "frog"], mask_threshold=0)
    with pytest.raises(ValueError, match="^guided_fraction="):
        attnctl.AStar(["cat"], guided_fraction=1.5)
    with pytest.raises(ValueError, match="^softmax_over='all' is not allowed"):
        attnctl.AttendAndExcite(["cat"], softmax_over="all")


def _sd2_like():
    pipe = tiny_pipeline("sd")
    pipe.tokenizer.pad_token = "!"  # SD 2.x's OpenCLIP tokenizer pads with "!", SD 1.x's with its end token
    return pipe


@pytest.mark.parametrize(
    "build, variant, softmax",
    [
        (lambda: tiny_pipeline("sd"), "sd1", "context"),
        (_sd2_like, "sd2", "prompt"),
        (lambda: tiny_pipeline("sdxl"), "sdxl", "prompt"),
        (lambda: tiny_pipeline("flux"), "flux", "prompt"),
    ],
)
def test_softmax_over_follows_the_authors_per_model(build, variant, softmax):
    pipe = build()
    with attnctl.control(pipe) as ctl:
        assert ctl.adapter.variant(pipe) == variant
        assert guidance.resolve_softmax_over("auto", ctl) == softmax
        assert guidance.resolve_softmax_over("prompt", ctl) == "prompt"


def test_bundled_testbed_is_sd1_like():
    from attnctl.testbed import load_pipeline

    pipe = load_pipeline()
    with attnctl.control(pipe) as ctl:
        assert guidance.resolve_softmax_over("auto", ctl) == "context"


def test_softmax_over_sets_the_loss_columns(pipe):
    # 77 text keys: over the full context each pixel's softmax spreads over 75 columns, over the
    # prompt's own tokens over 5, so the first A&E loss is far higher with the former
    first = {}
    for choice in ("auto", "context", "prompt"):
        control = attnctl.AttendAndExcite(["cat", "frog"], max_refinement=0, softmax_over=choice)
        with attnctl.control(pipe, control) as ctl:
            _run(pipe)
        first[choice] = ctl.log["AttendAndExcite"][0]["loss"]
    assert first["auto"] == first["context"]
    assert first["context"] > 0.95 > 0.9 > first["prompt"]


def test_softmax_over_context_needs_a_clip_sequence():
    flux = tiny_pipeline("flux")
    with pytest.raises(ValueError, match="^softmax_over='context' is not allowed for FluxPipeline"):
        with attnctl.control(flux, attnctl.AStar(["cat", "frog"], softmax_over="context")):
            pass


PROMPTS = ["a cat and a frog", "a red frog and a cat"]


@pytest.mark.parametrize(
    "control",
    [
        # 8 steps, fp64: 1 - T = 0.98375 is met after 7 and 5 updates (9e-5 or more away): 9 and 7 in all
        attnctl.AttendAndExcite(["cat", "frog"], scale=500.0, thresholds={0: 0.01625}, guided_fraction=0.25),
        attnctl.AStar(["cat", "frog"], iterations=2, guided_fraction=0.5),
    ],
)
def test_each_image_is_guided_on_its_own(control):
    # Double precision: in fp32 the pipeline's own batched kernels give ~1e-6 between an image alone
    # and in a batch, which would hide a coupling of that size; in fp64 that floor is 1e-15.
    pipe = tiny_pipeline("sd").to(torch.float64)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = tiny_call_kwargs("sd", num_inference_steps=8)
    with attnctl.control(pipe, control) as ctl:
        batch = pipe(PROMPTS, latents=latents, **kwargs).images
    name = type(control).__name__
    for i, prompt in enumerate(PROMPTS):
        with attnctl.control(pipe, control) as alone:
            image = pipe(prompt, latents=latents[i : i + 1], **kwargs).images[0]
        assert (image - batch[i]).abs().max() <= 1e-6
        in_batch = [(e["step"], e["iteration"]) for e in ctl.log[name] if e["image"] == i]
        assert in_batch == [(e["step"], e["iteration"]) for e in alone.log[name]]
    if name == "AttendAndExcite":  # the images refine for different lengths: decisions are per image
        counts = [sum(e["step"] == 0 and e["image"] == i for e in ctl.log[name]) for i in (0, 1)]
        assert counts == [9, 7]


def test_refinement_schedule_follows_the_authors():
    # Chefer et al.'s code: refinement updates until one is made from a latent whose loss is at most
    # 1 - T (or max_refinement were made), then the step's regular update
    run = type("Run", (), {"num_steps": 50, "step": 0})()
    excite = attnctl.AttendAndExcite(["cat"], thresholds={0: 0.5}, max_refinement=20)

    def updates(losses: list[float], spec: attnctl.AttendAndExcite = excite) -> int:
        n = 1
        while spec._more_updates(run, losses[:n]):
            n += 1
        return n

    assert updates([0.4]) == 1  # the loss already meets 1 - T: the regular update alone
    assert updates([0.8, 0.7, 0.45, 0.3, 0.2]) == 4  # z0, z1 and z2 (loss .45) refine, z3 regular
    assert updates([0.9] * 30) == 21  # 20 refinement updates, then the regular one
    assert updates([0.9] * 30, dataclasses.replace(excite, max_refinement=2)) == 3
    assert updates([0.9] * 30, dataclasses.replace(excite, max_refinement=0)) == 1
    run.step = 1  # no threshold at this step
    assert updates([0.9] * 30) == 1


class _Calls:
    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(lambda *a: setattr(self, "count", self.count + 1))


@pytest.mark.parametrize(
    ("family", "overrides"), [("sd", {}), ("flux", {"num_layers": 2, "num_single_layers": 2})]
)
def test_guided_runs_leave_no_graph_behind(family, overrides):
    """A guided generation's gradient graphs end with it: no tensor of a gradient forward outlives
    the run (a graph held in a cycle through autograd's nodes, which Python's collector cannot see,
    kept each run's activations until the process ended)."""
    import gc

    pipe = tiny_pipeline(family, **overrides)

    def graph_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)

    before = graph_tensors()
    for _ in range(2):
        with attnctl.control(pipe, attnctl.AStar(["cat", "frog"], iterations=2)) as ctl:
            _run(pipe, family, num_inference_steps=2)
        assert ctl.log["AStar"]  # it guided
        assert graph_tensors() == before


@pytest.mark.parametrize(
    "control", [attnctl.AttendAndExcite(["cat", "frog"], max_refinement=2), attnctl.AStar(["cat", "frog"])]
)
def test_gradient_forward_ends_at_the_last_map(pipe, control, monkeypatch):
    # the tiny SD reads its 8x8 maps (down_blocks.1, mid_block, up_blocks.0): the 16x16 up block and
    # conv_out never run in a gradient forward
    calls = _Calls(pipe.unet.up_blocks[1]), _Calls(pipe.unet.conv_out)
    try:
        plain = _run(pipe)
        assert calls[0].count == calls[1].count == 4 * 1  # 4 steps, CFG in one batch
        with attnctl.control(pipe, control) as ctl:
            early = _run(pipe)
        assert ctl.log[type(control).__name__] and calls[0].count == calls[1].count == 8
    finally:
        for c in calls:
            c.handle.remove()
    recorded = guidance._Collector.observe

    def observe_without_exit(self, call):
        try:
            recorded(self, call)
        except guidance._MapsRecorded:
            pass

    monkeypatch.setattr(guidance._Collector, "observe", observe_without_exit)
    monkeypatch.setattr(guidance._Collector, "kernel", AttentionEdit.kernel)  # the last layer's exit
    with attnctl.control(pipe, control) as full:
        complete = _run(pipe)
    assert [e["loss"] for e in full.log[type(control).__name__]] == pytest.approx(
        [e["loss"] for e in ctl.log[type(control).__name__]], abs=1e-6
    )
    assert (early - complete).abs().max() <= 1e-5 and (early - plain).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("family", "read", "unread"),
    [
        ("flux", "transformer_blocks.0", "single_transformer_blocks.0"),
        ("sd3", "transformer_blocks.0", "transformer_blocks.1"),
    ],
)
def test_dit_guidance_reads_the_first_half_of_blocks(family, read, unread):
    # a DiT attends at one token grid: the loss reads the text layers of the first half of its blocks
    # (guidance.DIT_DEPTH) and the gradient forward never enters the blocks after them
    dit = tiny_pipeline(family)
    denoiser = dit.transformer
    calls = {name: _Calls(denoiser.get_submodule(name)) for name in (read, unread)}
    try:
        with attnctl.control(dit, attnctl.AStar(["cat", "frog"])) as ctl:
            _run(dit, family, num_inference_steps=2)
    finally:
        for c in calls.values():
            c.handle.remove()
    forwards = 2  # 2 steps (SD3: CFG rows in one batch)
    assert ctl.log["AStar"] and calls[read].count == forwards + 1  # + the one gradient forward
    assert calls[unread].count == forwards


@pytest.mark.parametrize(
    ("family", "overrides", "checkpointed"),
    [
        ("flux", {"num_layers": 2, "num_single_layers": 2}, ["transformer_blocks.0"]),
        ("sd3", {"num_layers": 4}, ["transformer_blocks.0"]),
    ],
)
def test_dit_gradient_forward_checkpoints_the_blocks_before_the_last(
    family, overrides, checkpointed, monkeypatch
):
    # the blocks before the last one the loss reads keep only their inputs and are recomputed in the
    # backward: the same losses and images bit for bit as without, and with Attention Regulation
    # (whose calls keep state) nothing is checkpointed
    dit = tiny_pipeline(family, **overrides)
    ran = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counted(function, *args, **kwargs):
        ran.append(function.__wrapped__.__self__)  # the block's own forward
        return checkpoint(function, *args, **kwargs)

    def run(*controls):
        with attnctl.control(dit, attnctl.AStar(["cat", "frog"], iterations=2), *controls) as ctl:
            images = _run(dit, family, num_inference_steps=3)
        return images, [e["loss"] for e in ctl.log["AStar"]]

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    images, losses = run()
    names = {name: m for name, m in dit.transformer.named_modules()}
    assert {next(n for n, m in names.items() if m is block) for block in ran} == set(checkpointed)
    assert len(ran) == len(losses) * len(checkpointed)  # once per gradient forward
    with monkeypatch.context() as m:
        m.setattr(guidance, "_checkpointed", lambda *a: contextlib.nullcontext())
        plain_images, plain_losses = run()
    assert losses == plain_losses and torch.equal(images, plain_images)
    ran.clear()
    run(attnctl.AttentionRegulation(["cat"]))
    assert not ran
    assert all("forward" not in vars(m) for m in dit.transformer.modules())  # the blocks as they were


@pytest.mark.parametrize(
    "control", [attnctl.AttendAndExcite(["cat", "frog"], max_refinement=2), attnctl.AStar(["cat", "frog"])]
)
def test_gradient_forward_computes_only_what_the_loss_needs(pipe, control, monkeypatch):
    # the last layer the loss reads (up_blocks.0.attentions.2 on the tiny SD) gives its maps but no
    # attention output, and no weight requires grad in the gradient forward: the same images, bit
    # for bit, as with both switched off, and the weights as they were afterwards
    last = "up_blocks.0.attentions.2.transformer_blocks.0.attn2"
    weights = []  # requires_grad of the weights at each call of the last layer
    hook = pipe.unet.get_submodule(last).register_forward_pre_hook(
        lambda m, a: weights.append([p.requires_grad for p in pipe.unet.parameters()])
    )
    kernel_for = UNetAdapter.kernel_for
    kernels = []  # (layer, grad enabled) of each attention kernel run in attnctl's processors

    def counting(adapter, processor):
        kernel = kernel_for(adapter, processor)

        def run(*args):
            kernels.append((processor.layer.name, torch.is_grad_enabled()))
            return kernel(*args)

        return run

    monkeypatch.setattr(UNetAdapter, "kernel_for", counting)
    try:
        with attnctl.control(pipe, control) as ctl:
            lean = _run(pipe)
    finally:
        hook.remove()
    updates = len(ctl.log[type(control).__name__])
    frozen = [flags for flags in weights if not any(flags)]  # the gradient forwards reach the last layer
    assert updates and len(frozen) == updates and len(weights) == 4 + updates
    # attnctl's processor runs in the gradient forwards only: the 8x8 layers before the last one
    # (two in down_blocks.1, the mid block's, two in up_blocks.0) compute their attention, it does not
    assert last not in {layer for layer, _ in kernels}
    assert len(kernels) == 5 * updates and all(grad for _, grad in kernels)
    assert all(p.requires_grad and p.grad is None for p in pipe.unet.parameters())
    monkeypatch.setattr(UNetAdapter, "kernel_for", kernel_for)
    monkeypatch.setattr(guidance._Collector, "kernel", AttentionEdit.kernel)
    monkeypatch.setattr(guidance, "_frozen", lambda module: contextlib.nullcontext())
    with attnctl.control(pipe, control):
        full = _run(pipe)
    assert torch.equal(lean, full)


def test_maps_record_the_denoising_forwards_only(pipe):
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as plain:
        _run(pipe)
    guide = attnctl.AttendAndExcite(["cat", "frog"], max_refinement=0)
    with attnctl.control(pipe, guide, attnctl.AttentionMaps(["cat"])) as guided:
        _run(pipe)
    assert guided.log["AttendAndExcite"] and guided.maps._counts == plain.maps._counts


# Refinement that stops on the threshold after different numbers of updates for the two images of
# PROMPTS, and on the cap at step 4, in a 20-step run (fp32, 32 px). At scale 500 the loss of the
# untrained tiny model falls about 3e-4 per update at step 0, from 0.985; 1 - T = 0.98392 is met
# after 5 updates by one image and 6 by the other, each 6e-5 or more from the threshold (7 and 8
# updates in all).
REFINING = {"scale": 500.0, "thresholds": {0: 0.01608, 10: 0.5}}


def test_excite_matches_diffusers_attend_and_excite():
    """The same tiny SD, prompts, tokens, latents and settings as diffusers' pipeline (the authors'
    per-image loop and refinement schedule, the full-context softmax): same updates, same images.

    DDIM: its model-input scaling is 1, so diffusers' unscaled gradient forward is right there (on
    Euler / LMS it is not, see `_input_scale`)."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    steps = 20
    ours = tiny_pipeline("sd")
    theirs = tiny_pipeline("sd")
    parts = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    reference = StableDiffusionAttendAndExcitePipeline(
        **{k: getattr(theirs, k) for k in parts},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    assert ours.tokenizer.model_max_length == 77
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = tiny_call_kwargs("sd", num_inference_steps=steps)
    their_updates = []
    update = reference._update_latent
    reference._update_latent = lambda latents, loss, step_size: (
        their_updates.append(float(loss.detach())) or update(latents, loss, step_size)
    )
    expected = reference(
        PROMPTS,
        token_indices=[[token_positions(ours.tokenizer, p, w)[0] for w in ("cat", "frog")] for p in PROMPTS],
        latents=latents,
        max_iter_to_alter=steps // 2,
        thresholds={round(k * steps / 50): v for k, v in REFINING["thresholds"].items()},
        scale_factor=REFINING["scale"],
        attn_res=(8, 8),
        **kwargs,
    ).images
    control = attnctl.AttendAndExcite(
        ["cat", "frog"], guided_fraction=0.5, softmax_over="context", **REFINING
    )
    with attnctl.control(ours, control) as ctl:
        images = ours(PROMPTS, latents=latents, **kwargs).images
    # diffusers guides image after image: order our updates so
    log = sorted(ctl.log["AttendAndExcite"], key=lambda e: (e["step"], e["image"], e["iteration"]))
    assert len(log) == len(their_updates)
    assert max(abs(e["loss"] - v) for e, v in zip(log, their_updates, strict=True)) <= 1e-6
    assert (images - expected).abs().max() <= 1e-4


def test_guidance_composes_with_pag_in_either_order(pipe):
    # the gradient forward runs inside the pipeline's own call, where PAG has already added its rows
    guide = attnctl.AttendAndExcite(["cat", "frog"], max_refinement=0)
    with attnctl.control(pipe, attnctl.PAG(["mid_block"])):
        pag = _run(pipe)
    images = []
    for controls in ([attnctl.PAG(["mid_block"]), guide], [guide, attnctl.PAG(["mid_block"])]):
        with attnctl.control(pipe, *controls):
            images.append(_run(pipe))
    assert (images[0] - images[1]).abs().max() <= 1e-6 and (images[0] - pag).abs().max() > 1e-4


def test_an_update_that_makes_the_latent_non_finite_stops_the_run_and_restores(monkeypatch):
    """A guidance step that would leave NaN in the latent ends the generation with one error naming
    the control and the step; the pipeline is put back."""
    from attnctl.processors import guidance as guidance_module

    pipe = tiny_pipeline("sd")
    processors = dict(pipe.unet.attn_processors)
    monkeypatch.setattr(guidance_module, "step_sizes", lambda n, scale: [float("inf")] * n)
    with pytest.raises(ValueError, match=r"AStar made the latent non-finite at step 0 \(scale=20.0"):
        with attnctl.control(pipe, attnctl.AStar(["cat", "frog"])):
            pipe("a cat and a frog", **tiny_call_kwargs("sd"))
    assert pipe.unet.attn_processors == processors
    assert "step" not in vars(pipe.scheduler)


@pytest.mark.parametrize(
    "control",
    [attnctl.PAG(["mid_block"], scale=3e38), attnctl.AttentionRegulation(["cat"], lr=1e4)],
    ids=["PAG", "AttentionRegulation"],
)
def test_a_control_that_makes_the_prediction_non_finite_stops_the_run_and_restores(control):
    """Finite but far too large settings: the first non-finite prediction ends the run with one error
    naming the control and the step (not a NaN image), and the pipeline is put back. Observers alone
    never stop a run: their output is the plain pipeline's."""
    pipe = tiny_pipeline("sd")
    processors = dict(pipe.unet.attn_processors)
    name = type(control).__name__
    with pytest.raises(
        ValueError, match=rf"^the denoiser's prediction is not finite at step \d+ under {name}: "
    ):
        with attnctl.control(pipe, control, attnctl.AttentionMaps(["cat"])):
            pipe("a cat and a frog", **tiny_call_kwargs("sd"))
    assert pipe.unet.attn_processors == processors and not vars(pipe.unet).get("forward")
