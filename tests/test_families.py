"""Every family, on its tiny model, against the support matrix (`attnctl.families.support`).

Per family: AttentionMaps equal an explicit softmax computed from q and k that this test captures
itself (by wrapping the kernel the layer's processor calls, for a plain run), observing leaves the
output bit-identical, restore is exact, every ✓ method runs and changes what it should, and every
other method is refused at `control()` entry with its reason.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.core.layers import working_layers
from attnctl.families import ADAPTERS, adapter_for
from attnctl.families.base import attention_modules
from attnctl.families.support import METHODS, SUPPORTED, markdown, status
from attnctl.tiny import FAMILIES, tiny_call_kwargs, tiny_pipeline, video_tokens

PROMPT = "a cat and a frog"


def _image_first(queries, keys, n):
    return slice(0, n), slice(n, keys)


def _text_first(queries, keys, n):
    return slice(keys - n, keys - n + n), slice(0, keys - n)


def _cross(queries, keys, n):
    return slice(0, queries), slice(0, keys)


def _registers_text_image(queries, keys, n):
    # AuraFlow: 8 learned register tokens (`register_tokens`, [1, 8, C]) before the text, image last
    return slice(keys - n, keys), slice(8, keys - n)


def _prefix_then_target(queries, keys, n):
    # Qwen-Image 2.1 (QwenImage21AttnProcessor): a prefill runs one call per prefix segment (queries:
    # the segment, keys [0, end)), then the target image's (queries: the n target tokens, keys: the
    # prefix then the target); a decode only the target's, over [cached prefix ; target]
    if queries != n or keys <= queries:
        return None  # a prefix segment's call: no image query
    return slice(0, n), slice(0, keys - n)


# Where image queries and text keys sit in the kernel call of a layer attending to text, written
# here from the models' code (not from attnctl's adapters): (queries, keys, image tokens) -> slices,
# or None for a call without image queries (no map comes from it).
TOKEN_ORDER = {
    "sd": _cross,
    "sdxl": _cross,
    "sd3": _image_first,
    "flux": _text_first,
    "wan": _cross,
    "cogvideox": _text_first,
    "hunyuanvideo": _image_first,
    "sana": _cross,  # attn2: q = image tokens, k = the Gemma text (attn1 is linear, no kernel call)
    "lumina2": _text_first,  # layers.N.attn: [text unpadded, image] (equal text lengths in a call)
    "cogview4": _text_first,  # attn1: cat([encoder_hidden_states, hidden_states])
    "pixart": _cross,  # attn2: q = image tokens, k = the T5 tokens
    "auraflow": _registers_text_image,
    # [image ; T5 ; Llama last layer ; Llama layer of the block]: the positions index the T5 part
    "hidream": _image_first,
    "chroma": _text_first,
    "flux2": _text_first,
    "qwenimage": _text_first,
    "zimage": _image_first,
    # blocks.N.attn2: q = the video tokens, k = the UMT5 text (WanAttnProcessor, as wan); the control
    # branch (vace_blocks) is no layer
    "wanvace": _cross,
    "skyreelsv2": _cross,  # blocks.N.attn2 (SkyReelsV2AttnProcessor): q = the video tokens, k = the UMT5 text
    "ltx": _cross,  # attn2: q = the video tokens, k = the T5 tokens (padding: a -10000 key bias)
    "mochi": _image_first,  # attn1: [video ; the row's unpadded T5 tokens], one kernel call per row
    # [video ; valid ByT5 ; valid Qwen ; image-embedding, ByT5, Qwen pads]: no quotes in the prompt,
    # so the positions index the Qwen tokens from the first text key on
    "hunyuanvideo15": _image_first,
    "kandinsky5": _cross,  # visual_transformer_blocks.N.cross_attention: q = video, k = the Qwen text
    "qwenimage21": _prefix_then_target,  # transformer_blocks.N.attn: [text ; image], block-causal
    # transformer_blocks.N.attn2: q = the video tokens, k = the connectors' text (audio attends in
    # modules of its own: audio_attn2, audio_to_video_attn)
    "ltx2": _cross,
}

# How a pipeline runs classifier-free guidance where it does not name the branches with
# `cache_context`, written from the pipelines' code: "stacked" [uncond, cond] in one batch (diffusers'
# usual order, the default here), "cond_first" stacked as [cond, uncond], "separate" one forward of the
# prompt and then one of the negative prompt at each step, "per_row" stacked [uncond, cond] but the
# processor calls the kernel once per batch row (kernel call i of a processor call is row i).
CFG = {
    "chroma": "separate",
    "lumina2": "separate",
    "zimage": "cond_first",
    "mochi": "per_row",
    "kandinsky5": "separate",
}
# Pipelines that cannot run a single step (Mochi's linear-quadratic schedule divides by steps // 2).
FEWEST_STEPS = {"mochi": 2}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    pipe = tiny_pipeline(name)
    return name, pipe, _run(pipe, name)


def _denoiser(pipe):
    return getattr(pipe, "transformer", None) or pipe.unet


def _run(pipe, family, **overrides):
    kwargs = tiny_call_kwargs(family, **overrides)
    out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)  # FLUX.2: image first
    return out.frames if hasattr(out, "frames") else out.images


def test_every_adapter_has_a_tiny_model_and_a_token_order():
    covered = {adapter_for(_denoiser(tiny_pipeline(f))).name for f in FAMILIES}
    assert covered == {a.name for a in ADAPTERS}
    assert set(TOKEN_ORDER) == set(FAMILIES)


def test_readme_shows_the_generated_support_matrix():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = markdown(ADAPTERS)
    assert table in readme, (
        f"README's support matrix is out of date; `attnctl families --markdown` gives:\n{table}"
    )


def test_dit_default_layers_are_every_text_layer(family):
    """The default layer rule: the text-attending level at latent/4, else the lowest one above it.
    A DiT attends at one token grid in every layer, so the rule takes them all."""
    name, pipe, _ = family
    with attnctl.control(pipe) as ctl:
        text = [x for x in ctl.layers if x.kind in ("cross", "joint")]
    chosen = working_layers(ctl.layers, 16, 16)
    assert chosen and len({x.downsample for x in chosen}) == 1  # one level of a UNet
    if name not in ("sd", "sdxl"):
        assert chosen == text


@contextlib.contextmanager
def _kernel_calls(pipe, family, layer_name):
    """q, k [B, H, S, D], mask and scale of every attention-kernel call inside one layer, and which
    CFG branch the denoiser ran it for: the test's own capture, whatever attnctl does."""
    denoiser = _denoiser(pipe)
    module = denoiser.get_submodule(layer_name)
    defining = sys.modules[type(module.processor).__call__.__module__]
    calls, state = [], {"inside": False, "branch": None, "timestep": None, "forwards": 0, "index": 0}

    def forward(_, args, kwargs):  # "separate" CFG: the step's first forward is the prompt's
        t = kwargs.get("timestep", kwargs.get("t", args[1] if len(args) > 1 else None))
        t = None if t is None else float(torch.as_tensor(t).flatten()[0])
        state["forwards"] = state["forwards"] + 1 if t == state["timestep"] else 1
        state["timestep"] = t
        if CFG.get(family) == "separate":
            state["branch"] = "cond" if state["forwards"] == 1 else "uncond"
        latent = kwargs.get("hidden_states", args[0] if args else None)
        state["batch"] = latent.shape[0] if torch.is_tensor(latent) else None

    hooks = [
        module.register_forward_pre_hook(lambda *_: state.update(inside=True, index=0)),
        module.register_forward_hook(lambda *_: state.update(inside=False)),
        denoiser.register_forward_pre_hook(forward, with_kwargs=True),
    ]
    dispatch = getattr(defining, "dispatch_attention_fn", None)
    original_context = getattr(denoiser, "cache_context", None)

    @contextlib.contextmanager
    def cache_context(name, *args, **kwargs):
        state["branch"] = name
        with original_context(name, *args, **kwargs):
            yield

    def record(q, k, mask, scale, heads_first):
        if state["inside"]:
            q, k = (q, k) if heads_first else (q.transpose(1, 2), k.transpose(1, 2))
            branch = state["branch"]
            if CFG.get(family) == "per_row" and state["batch"] == 2:  # [uncond, cond], row by row
                branch = ("uncond", "cond")[state["index"]]
            state["index"] += 1
            calls.append((q.detach().float(), k.detach().float(), mask, scale, branch))

    def sdpa(q, k, v, attn_mask=None, *args, scale=None, **kwargs):
        record(q, k, attn_mask, scale, True)
        return original_sdpa(q, k, v, attn_mask, *args, scale=scale, **kwargs)

    def dispatch_attention_fn(q, k, v, attn_mask=None, *args, scale=None, **kwargs):
        record(q, k, attn_mask, scale, False)
        return dispatch(q, k, v, attn_mask, *args, scale=scale, **kwargs)

    original_sdpa = F.scaled_dot_product_attention
    if original_context is not None:
        denoiser.cache_context = cache_context
    if dispatch is not None:
        defining.dispatch_attention_fn = dispatch_attention_fn
    else:
        F.scaled_dot_product_attention = sdpa
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original_sdpa
        if dispatch is not None:
            defining.dispatch_attention_fn = dispatch
        vars(denoiser).pop("cache_context", None)
        for h in hooks:
            h.remove()


def _explicit_map(calls, family, positions, image_tokens):
    """The word's map from captured q and k: softmax over all keys (mask included), image queries
    to the word's text keys, averaged over heads, the word's tokens, conditional rows and calls."""
    maps = []
    for q, k, mask, scale, branch in calls:
        if branch in ("uncond", "pred_uncond"):  # pred_uncond: diffusers' guiders (HunyuanVideo 1.5)
            continue
        rows = list(range(q.shape[0]))
        if q.shape[0] == 2 and branch in (None, "cond_uncond"):  # CFG stacked in one batch
            rows = [0] if CFG.get(family) == "cond_first" else [1]
        order = TOKEN_ORDER[family](q.shape[2], k.shape[2], image_tokens or q.shape[2])
        if order is None:
            continue
        image, text = order
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = q[rows] @ k[rows].transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        if mask is not None:
            mask = mask[:, None, None, :] if mask.dim() == 2 else mask
            mask = mask[rows] if mask.shape[0] > 1 else mask
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        probs = logits.softmax(-1)[:, :, image, text]
        maps.append(probs[..., positions].mean(-1).mean(1).mean(0))
    return torch.stack(maps).mean(0)


def test_maps_equal_an_explicit_softmax(family):
    name, pipe, _ = family
    with attnctl.control(pipe) as ctl:
        layers = [x for x in ctl.layers if x.kind in ("cross", "joint")]
    positions = adapter_for(_denoiser(pipe)).text_positions(pipe, PROMPT, "frog")
    image_tokens = None if name in ("sd", "sdxl") else video_tokens(name)
    for layer in (layers[0], layers[-1]):  # e.g. FLUX: a double- and a single-stream block
        with _kernel_calls(pipe, name, layer.name) as calls:
            _run(pipe, name, num_inference_steps=FEWEST_STEPS.get(name, 1))
        with attnctl.control(pipe, attnctl.AttentionMaps(["frog"], layers=[layer.name])) as ctl:
            _run(pipe, name, num_inference_steps=FEWEST_STEPS.get(name, 1))
        expected = _explicit_map(calls, name, positions, image_tokens)
        got = ctl.maps["frog"].flatten()
        assert got.shape == expected.shape, layer.name
        assert torch.corrcoef(torch.stack([got, expected]))[0, 1] >= 0.99, layer.name
        assert (got - expected).norm() <= 1e-3 * expected.norm(), layer.name


def test_observing_leaves_the_output_bit_identical(family):
    name, pipe, base = family
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat", "frog"])) as ctl:
        out = _run(pipe, name)
    assert torch.equal(out, base)
    assert ctl.maps["frog"].sum() > 0


def _state(pipe):
    """What a session may touch: processors, hooks, instance attributes of every module and of the
    pipeline's objects, and the kernel names in the processors' modules."""
    denoiser = _denoiser(pipe)
    modules = {
        name: (m.processor, dict(vars(m.processor))) for name, m in attention_modules(denoiser).items()
    }
    defining = {sys.modules[type(p).__call__.__module__] for p, _ in modules.values()}
    return {
        "processors": modules,
        "module_attrs": {n: dict(vars(m)) for n, m in denoiser.named_modules()},
        "pipe_attrs": dict(vars(pipe)),
        "scheduler_attrs": set(vars(pipe.scheduler)),
        "kernels": {
            (m.__name__, a): getattr(m, a, None) for m in defining for a in ("dispatch_attention_fn", "F")
        },
        "sdpa": F.scaled_dot_product_attention,
    }


def _applicable(pipe, name):
    adapter = adapter_for(_denoiser(pipe))
    return [m for m in METHODS if status(adapter, m)[0] == SUPPORTED]


def _control(method, pipe):
    with attnctl.control(pipe) as ctl:
        perturbable = next(x for x in ctl.layers if x.kind in ("self", "joint"))
    return {
        "AttentionMaps": lambda: attnctl.AttentionMaps(["cat", "frog"]),
        "AttentionRegulation": lambda: attnctl.AttentionRegulation(["cat", "frog"]),
        "AttendAndExcite": lambda: attnctl.AttendAndExcite(["cat", "frog"]),
        "AStar": lambda: attnctl.AStar(["cat", "frog"]),
        "SoftPAG": lambda: attnctl.SoftPAG({perturbable.name: [0]}, u=0.5, scale=3.0),
        "PAG": lambda: attnctl.PAG([perturbable.name], scale=3.0),
        "Layout": lambda: attnctl.Layout(
            [attnctl.Region([0, 0, 0.5, 1], "a cat"), attnctl.Region([0.5, 0, 1, 1], "a frog")]
        ),
        "DraftAttention": lambda: attnctl.DraftAttention(sparsity=0.5, pool=(1, 1), dense_steps=0.0),
    }[method]()


def test_restore_is_exact_after_every_method_together(family):
    name, pipe, base = family
    before = _state(pipe)
    controls = [_control(m, pipe) for m in _applicable(pipe, name)]
    with attnctl.control(pipe, *controls):
        _run(pipe, name)
    after = _state(pipe)
    assert after == before
    assert torch.equal(_run(pipe, name), base)


def _shape(pipe):
    """What a twin pipeline can be compared on: each module's attribute names, its processors' and
    hooks' classes."""
    denoiser = _denoiser(pipe)
    registry = getattr(denoiser, "_diffusers_hook", None)
    return {
        "attrs": {n: sorted(vars(m)) for n, m in denoiser.named_modules()},
        "processors": {n: type(m.processor).__name__ for n, m in attention_modules(denoiser).items()},
        "hooks": None if registry is None else sorted(registry.hooks),
        "pipe": sorted(vars(pipe)),
        "scheduler": sorted(vars(pipe.scheduler)),
    }


def test_restore_leaves_what_a_run_without_attnctl_leaves(family):
    """After a controlled run the pipeline is in the state a twin that never saw attnctl is in after
    the same run (e.g. the hook registry a FLUX pipeline's own cache contexts create)."""
    name = family[0]
    pipe, twin = tiny_pipeline(name), tiny_pipeline(name)  # neither has run before
    _run(twin, name)
    controls = [_control(m, pipe) for m in _applicable(pipe, name)]
    with attnctl.control(pipe, *controls):
        _run(pipe, name)
    assert _shape(pipe) == _shape(twin)


@pytest.mark.parametrize("method", METHODS)
def test_method(family, method):
    name, pipe, base = family
    mark, why = status(adapter_for(_denoiser(pipe)), method)
    control = _control(method, pipe)
    if mark != SUPPORTED:
        before = _state(pipe)
        with pytest.raises(ValueError, match=f"{method} does not work on .*: {why[:20]}"):
            with attnctl.control(pipe, control):
                pass
        assert _state(pipe) == before
        return
    with attnctl.control(pipe, control) as ctl:
        out = _run(pipe, name)
    assert torch.isfinite(out).all()
    if method == "AttentionMaps":
        assert torch.equal(out, base) and ctl.maps["cat"].sum() > 0
    else:
        assert not torch.equal(out, base), f"{method} changed nothing on {name}"


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_every_pair_of_methods_composes(family):
    """Any two methods in one control(): they run together to a finite image, or the pair is refused
    at entry with one line (none is, on these families)."""
    import itertools

    pipe = tiny_pipeline(family)
    methods = _applicable(pipe, family)
    for a, b in itertools.combinations(methods, 2):
        out = None
        with attnctl.control(pipe, _control(a, pipe), _control(b, pipe)):
            out = _run(pipe, family)
        assert out is not None and torch.isfinite(out).all(), (a, b)
