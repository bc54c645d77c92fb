"""SD3 and FLUX adapters: baseline equivalence, maps against an explicit softmax, restore, layouts."""

from __future__ import annotations

import types

import pytest
import torch

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.families import adapter_for
from attnctl.families.flux import FluxAdapter
from attnctl.families.sd3 import SD3Adapter
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


@pytest.fixture(scope="module", params=["sd3", "flux"])
def family_pipe(request):
    family = request.param
    pipe = tiny_pipeline(family)
    return family, pipe, _run(pipe, family)


def _run(pipe, family, **overrides):
    kwargs = tiny_call_kwargs(family, **overrides)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


class _Capture(AttentionEdit):
    """Test-only edit: keeps q, k, layout and conditional rows of every call it sees."""

    def __init__(self):
        self.calls = []

    def observe(self, call):
        self.calls.append(
            (call.query.detach().clone(), call.key.detach().clone(), call.layout, list(call.cond_rows))
        )


def test_adapter_and_layers(family_pipe):
    family, pipe, _ = family_pipe
    assert type(adapter_for(pipe.transformer)) is {"sd3": SD3Adapter, "flux": FluxAdapter}[family]
    with attnctl.control(pipe) as ctl:
        names = [(layer.name, layer.kind, layer.block) for layer in ctl.layers]
    if family == "sd3":
        assert names == [(f"transformer_blocks.{i}.attn", "joint", f"transformer_blocks.{i}") for i in (0, 1)]
    else:
        assert names == [
            ("transformer_blocks.0.attn", "joint", "transformer_blocks.0"),
            ("single_transformer_blocks.0.attn", "joint", "single_transformer_blocks.0"),
        ]


def test_no_controls_is_bit_identical(family_pipe):
    family, pipe, base = family_pipe
    with attnctl.control(pipe):
        same = _run(pipe, family)
    assert torch.equal(base, same)


def test_maps_only_matches_baseline(family_pipe):
    family, pipe, base = family_pipe
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        out = _run(pipe, family)
        grid = ctl.grid
    assert (out - base).abs().max() <= 1e-5
    # 32 px images, 2x VAE, 2x2 patches: an 8x8 grid of image tokens
    assert grid == (1, 8, 8) and ctl.maps["cat"].shape == (8, 8)


def test_maps_match_explicit_softmax(family_pipe):
    family, pipe, _ = family_pipe
    with attnctl.control(pipe) as probe:
        # Flux: one double-stream and one single-stream layer (text length from the denoiser call)
        layers = list({layer.block.split(".")[0]: layer for layer in reversed(probe.layers)}.values())
    for layer in layers:
        capture = _Capture()
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"], layers=[layer.name], steps=[0])) as ctl:
            ctl.add_edit([layer], capture)
            _run(pipe, family)
            positions = ctl.text_positions("cat")[0]
            text_len = ctl.text_len
        q, k, layout, rows = capture.calls[0]  # step 0
        # Where the tokens sit, independently of the adapter: SD3 [image ; text], Flux [text ; image].
        image, text = (slice(0, 64), 64) if family == "sd3" else (slice(text_len, text_len + 64), 0)
        assert q.shape[2] == k.shape[2] == 64 + text_len
        assert (layout.image_q, layout.text_k) == (image, slice(text, text + text_len))
        probs = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)  # over all keys
        expected = probs[rows][:, :, image][..., [text + p for p in positions]].mean(-1).mean(1).mean(0)
        assert torch.allclose(ctl.maps["cat"], expected.reshape(8, 8), atol=1e-5), layer.name


def test_text_positions(family_pipe):
    family, pipe, _ = family_pipe
    if family == "flux":  # text keys are the T5 tokens
        ids = pipe.tokenizer_2(PROMPT)["input_ids"]
        found = FluxAdapter().text_positions(pipe, PROMPT, "frog")
        assert pipe.tokenizer_2.decode([ids[p] for p in found]).strip() == "frog"
        with pytest.raises(ValueError, match="dog"):
            FluxAdapter().text_positions(pipe, PROMPT, "dog")
        assert FluxAdapter().prompt_span(pipe, PROMPT) == ([0, 1, 2, 3, 4], [5])  # 5 words, then </s>
        return
    # SD3: CLIP part (77 tokens), then the T5 part
    clip = pipe.tokenizer(PROMPT)["input_ids"]
    t5 = pipe.tokenizer_3(PROMPT)["input_ids"]
    positions = SD3Adapter().text_positions(pipe, PROMPT, "frog")
    clip_part = [p for p in positions if p < 77]
    t5_part = [p - 77 for p in positions if p >= 77]
    assert pipe.tokenizer.decode([clip[p] for p in clip_part]).strip() == "frog"
    assert pipe.tokenizer_3.decode([t5[p] for p in t5_part]).strip() == "frog"
    # without T5 the pipeline feeds zeros in the T5 part: CLIP positions only
    no_t5 = types.SimpleNamespace(tokenizer=pipe.tokenizer, tokenizer_max_length=77, tokenizer_3=None)
    assert SD3Adapter().text_positions(no_t5, PROMPT, "frog") == clip_part
    with pytest.raises(ValueError, match="dog"):
        SD3Adapter().text_positions(pipe, PROMPT, "dog")
    # CLIP: <start> 5 words <end>; T5: 5 words </s>
    assert SD3Adapter().prompt_span(pipe, PROMPT) == ([1, 2, 3, 4, 5, 77, 78, 79, 80, 81], [0, 6, 82])


def _forward_equivalence(transformer, kwargs):
    """The transformer's output with every layer routed through the adapter equals the plain output."""
    base = transformer(**kwargs, return_dict=False)[0]
    capture = _Capture()
    with attnctl.control(types.SimpleNamespace(transformer=transformer)) as ctl:
        ctl.add_edit(ctl.layers, capture)
        out = transformer(**kwargs, return_dict=False)[0]
    assert torch.equal(base, out)
    return ctl, capture


def test_sd35_dual_attention_and_qk_norm():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        hidden_states=torch.randn(1, 4, 16, 12, generator=g),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([500.0]),
    )
    with torch.no_grad():
        ctl, capture = _forward_equivalence(transformer, kwargs)
    assert [(layer.name, layer.kind) for layer in ctl.layers] == [
        ("transformer_blocks.0.attn", "joint"),
        ("transformer_blocks.0.attn2", "self"),
        ("transformer_blocks.1.attn", "joint"),  # the last block is context_pre_only
    ]
    joint, dual = capture.calls[0][2], capture.calls[1][2]
    assert (
        (joint.height, joint.width) == (8, 6)
        and joint.image_q == slice(0, 48)
        and joint.text_k == slice(48, 55)
    )
    assert dual.text_k is None and dual.image_k == slice(0, 48)


def test_flux_fused_projections_and_reference_tokens():
    transformer = tiny_pipeline("flux").transformer
    transformer.fuse_qkv_projections()
    assert transformer.transformer_blocks[0].attn.fused_projections
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    generated = torch.stack([torch.zeros(24), rows.flatten(), cols.flatten()], -1)
    reference = torch.stack([torch.ones(4), torch.zeros(4), torch.arange(4.0)], -1)  # Kontext-style
    kwargs = dict(
        hidden_states=torch.randn(1, 28, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.cat([generated, reference]),
        txt_ids=torch.zeros(5, 3),
    )
    with torch.no_grad():
        ctl, capture = _forward_equivalence(transformer, kwargs)
    assert ctl.grid == (1, 4, 6) and ctl.text_len == 5
    for _, _, layout, _ in capture.calls:  # double- and single-stream layers alike
        assert (
            layout.text_k == slice(0, 5) and layout.image_q == slice(5, 29) and layout.image_k == slice(5, 33)
        )


def test_flux_seam_follows_a_backend_set_inside_the_block(monkeypatch):
    """attnctl takes q, k, v at the model's own dispatch_attention_fn call, with the backend its
    processor passes: one set inside control() (as set_attention_backend does, per processor) is
    used, and the processors have their own back on exit."""
    import diffusers.models.transformers.transformer_flux as flux_module

    pipe = tiny_pipeline("flux")
    seen = []
    original = flux_module.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):
        seen.append(str(backend))
        return original(*args, backend=backend, **kwargs)

    monkeypatch.setattr(flux_module, "dispatch_attention_fn", spy)
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        for processor in pipe.transformer.attn_processors.values():
            processor._attention_backend = "_native_math"
        _run(pipe, "flux")
    assert len(seen) == len(ctl.layers) * 2 and set(seen) == {"_native_math"}  # 2 steps
    assert ctl.maps["cat"].shape == (8, 8)
    assert flux_module.dispatch_attention_fn is spy
    assert all(p._attention_backend is None for p in pipe.transformer.attn_processors.values())


def test_word_past_the_calls_text_length_is_a_clear_error():
    pipe = tiny_pipeline("flux")
    prompt = "a frog " + "and a dog " * 12 + "and a cat"
    with pytest.raises(ValueError, match="'cat' lies past the 8 text tokens"):
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])):
            pipe(prompt, **tiny_call_kwargs("flux", max_sequence_length=8))
