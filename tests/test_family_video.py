"""Video DiT adapters (Wan, CogVideoX, HunyuanVideo): exactness, maps against an explicit softmax, restore;
Wan 2.2's two experts (Wan and Wan VACE); the I2V image context of Wan and SkyReels-V2."""

from __future__ import annotations

import types

import pytest
import torch

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.core.processor import AttnctlProcessor
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"
# Non-square and multi-frame, so a swapped axis shows: 5 frames -> 2 latent frames, 16 px per token.
SIZE = {"height": 32, "width": 64, "num_frames": 5}
GRID = (2, 2, 4)
# One layer per family for the explicit check: the path with the most moving parts.
CHECK_LAYER = {
    "wan": "blocks.1.attn2",  # cross-attention to text
    "cogvideox": "transformer_blocks.1.attn1",  # joint, text first
    "hunyuanvideo": "single_transformer_blocks.0.attn",  # joint, text last, padded text masked
}


@pytest.fixture(scope="module", params=["wan", "cogvideox", "hunyuanvideo"])
def video(request):
    family = request.param
    pipe = tiny_pipeline(family)
    return family, pipe, _run(pipe, family)


def _run(pipe, family, **overrides):
    # Latent output: what the transformer produced, without the (slow, irrelevant) VAE decode.
    kwargs = tiny_call_kwargs(family, **SIZE, output_type="latent", **overrides)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).frames


class _Capture(AttentionEdit):
    """Test-only edit: keeps what each call of a layer exposes to controls."""

    def __init__(self):
        self.calls = []

    def observe(self, call):
        self.calls.append(
            {
                "step": call.session.step,
                "rows": list(call.cond_rows),
                "query": call.query.detach().clone(),
                "key": call.key.detach().clone(),
                "mask": None if call.mask is None else call.mask.detach().clone(),
                "layout": call.layout,
            }
        )


def test_no_controls_is_bit_identical(video):
    family, pipe, base = video
    with attnctl.control(pipe):
        same = _run(pipe, family)
    assert torch.equal(base, same)


def test_maps_only_matches_baseline(video):
    family, pipe, base = video
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        out = _run(pipe, family)
        assert ctl.grid == GRID
    assert (out - base).abs().max() <= 1e-5
    assert ctl.maps["cat"].shape == GRID
    assert torch.isfinite(ctl.maps["cat"]).all() and (ctl.maps["cat"] >= 0).all()


def test_maps_equal_explicit_softmax(video):
    family, pipe, _ = video
    layer_name = CHECK_LAYER[family]
    capture = _Capture()
    maps = attnctl.AttentionMaps(["cat"], layers=[layer_name], steps=[0])
    with attnctl.control(pipe, maps) as ctl:
        layer = next(layer for layer in ctl.layers if layer.name == layer_name)
        ctl.add_edit([layer], capture)
        _run(pipe, family)
        positions = ctl.text_positions("cat")[0]
        text = ctl.text_len
    call = next(c for c in capture.calls if c["step"] == 0 and c["rows"])
    n = GRID[0] * GRID[1] * GRID[2]
    expected_slices = {  # (video queries, text keys) in the attention sequence
        "wan": (slice(0, n), slice(0, text)),
        "cogvideox": (slice(text, text + n), slice(0, text)),
        "hunyuanvideo": (slice(0, n), slice(n, n + text)),
    }[family]
    assert (call["layout"].image_q, call["layout"].text_k) == expected_slices
    if family == "cogvideox":  # one batched forward, [uncond, cond]
        assert call["rows"] == [1]
    q, k, layout = call["query"], call["key"], call["layout"]
    logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    mask = call["mask"]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    probs = logits.softmax(-1)[call["rows"]][:, :, layout.image_q]
    columns = [layout.text_k.start + p for p in positions]
    expected = probs[..., columns].mean(-1).mean(1).mean(0).reshape(GRID)
    assert torch.allclose(ctl.maps["cat"], expected, atol=1e-5)
    if family == "hunyuanvideo":
        assert mask is not None and not mask.all()  # padded text keys are masked


def test_layers_and_kinds():
    with attnctl.control(tiny_pipeline("wan")) as ctl:
        assert [(layer.name, layer.kind) for layer in ctl.layers[:2]] == [
            ("blocks.0.attn1", "self"),
            ("blocks.0.attn2", "cross"),
        ]
    with attnctl.control(tiny_pipeline("cogvideox")) as ctl:
        assert {layer.kind for layer in ctl.layers} == {"joint"}
    pipe = tiny_pipeline("hunyuanvideo")
    assert any("token_refiner" in name for name in pipe.transformer.attn_processors)
    with attnctl.control(pipe) as ctl:
        # the context embedder's text-only token refiner is not a layer
        assert [layer.name for layer in ctl.layers] == [
            "transformer_blocks.0.attn",
            "single_transformer_blocks.0.attn",
        ]


def test_hunyuan_positions_follow_the_crop():
    pipe = tiny_pipeline("hunyuanvideo")
    template = tiny_call_kwargs("hunyuanvideo")["prompt_template"]
    with attnctl.control(pipe) as ctl:
        positions = ctl.adapter.text_positions(pipe, PROMPT, "frog")
    # the text keys are the templated prompt's tokens from crop_start on, as the pipeline crops them
    ids = pipe.tokenizer(template["template"].format(PROMPT))["input_ids"][template["crop_start"] :]
    assert pipe.tokenizer.decode([ids[p] for p in positions]).strip() == "frog"


@pytest.mark.parametrize("model_class", ["WanTransformer3DModel", "SkyReelsV2Transformer3DModel"])
def test_i2v_image_context_is_kept(model_class):
    """Wan 2.1 and SkyReels-V2 I2V: attn2 also attends to CLIP image tokens (the context before the last
    512), in a separate kernel call: controls see the text attention only, and the output stays
    bit-identical."""
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, model_class)(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=16,
        num_layers=1,
        image_dim=8,
        added_kv_proj_dim=24,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 2, 4, 6),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 512, 16),  # diffusers hard-codes 512 text tokens
        "encoder_hidden_states_image": torch.randn(1, 3, 8),
        "return_dict": False,
    }
    with torch.no_grad():
        base = model(**inputs)[0]
        capture = _Capture()
        with attnctl.control(types.SimpleNamespace(transformer=model)) as ctl:
            ctl.add_edit(ctl.select("blocks.0.attn2"), capture)
            out = model(**inputs)[0]
    assert torch.equal(base, out)
    assert [(c["key"].shape[2], c["layout"].text_k) for c in capture.calls] == [(512, slice(0, 512))]
    layout = capture.calls[0]["layout"]
    assert (layout.frames, layout.height, layout.width) == (2, 2, 3)


@pytest.mark.parametrize("family", ["wan", "wanvace"])
def test_wan22_two_experts_are_both_controlled(family):
    """Wan 2.2 (and its VACE pipeline): `transformer` denoises the high-noise steps, `transformer_2`
    the rest; every control reaches both, and both are restored."""
    pipe = tiny_pipeline(family)
    torch.manual_seed(1)
    second = type(pipe.transformer).from_config(pipe.transformer.config).eval()
    pipe.register_modules(transformer_2=second)
    pipe.register_to_config(boundary_ratio=0.9)  # step 0 (t = 1000): transformer; step 1: transformer_2
    state = {"expert": None}
    for name, model in (("transformer", pipe.transformer), ("transformer_2", second)):
        model.register_forward_pre_hook(lambda *_, name=name: state.update(expert=name))
    base = _run(pipe, family)
    capture = _Capture()
    experts = []
    capture.observe = lambda call: experts.append((call.session.step, state["expert"]))
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"], steps=[1])) as ctl:
        ctl.add_edit(ctl.layers, capture)
        out = _run(pipe, family)
    assert torch.equal(out, base) and ctl.maps["frog"].sum() > 0  # the maps of transformer_2's step
    assert set(experts) == {(0, "transformer"), (1, "transformer_2")}
    for model in (pipe.transformer, second):
        assert not any(isinstance(p, AttnctlProcessor) for p in model.attn_processors.values())
    with attnctl.control(pipe, attnctl.PAG(["blocks.0.attn1"], scale=3.0)):
        assert not torch.equal(_run(pipe, family), base)
