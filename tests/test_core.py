"""control(): install/restore, step and branch tracking, maps on the UNet families, layer selection, controls."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import attnctl
from attnctl.core.attention import AttentionEdit
from attnctl.core.controls import Control
from attnctl.core.denoiser import BatchRows, DenoiserWrapper, append_rows, denoiser_output
from attnctl.core.layers import LayerSelection, SelectedLayer
from attnctl.core.session import PerGeneration, in_steps
from attnctl.families.base import LayerInfo, attention_modules
from attnctl.tiny import FAMILIES, tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def unet_pipe(request):
    return request.param, tiny_pipeline(request.param)


def _run(pipe, family, **overrides):
    kwargs = tiny_call_kwargs(family, **overrides)
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)  # FLUX.2: image first


def _output(result):
    return torch.as_tensor(result.images if hasattr(result, "images") else result.frames)


class _Capture(AttentionEdit):
    """Test-only edit: keeps q, k and layout of every call it sees."""

    def __init__(self):
        self.calls = []

    def observe(self, call):
        self.calls.append(
            (call.query.detach().clone(), call.key.detach().clone(), call.layout, list(call.cond_rows))
        )


def test_no_controls_is_bit_identical(unet_pipe):
    family, pipe = unet_pipe
    base = _output(_run(pipe, family))
    with attnctl.control(pipe):
        same = _output(_run(pipe, family))
    assert torch.equal(base, same)


def test_maps_only_matches_baseline_and_explicit_softmax(unet_pipe):
    family, pipe = unet_pipe
    base = _output(_run(pipe, family))
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat", "frog"])) as ctl:
        out = _output(_run(pipe, family))
    assert (out - base).abs().max() <= 1e-5
    assert set(ctl.maps.words()) == {"cat", "frog"}
    assert ctl.maps["cat"].dim() == 2

    with attnctl.control(pipe) as probe:
        layer = next(layer for layer in probe.layers if layer.kind == "cross")
    capture = _Capture()
    with attnctl.control(pipe, attnctl.AttentionMaps(["frog"], layers=[layer.name], steps=[1])) as ctl:
        ctl.add_edit([layer], capture)
        _run(pipe, family)
        positions = ctl.text_positions("frog")[0]
    # the capture sees every step; step 1 is the second call of this single layer
    q, k, layout, rows = capture.calls[1]
    probs = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)
    expected = probs[rows][:, :, :, positions].mean(-1).mean(1).mean(0).reshape(layout.height, layout.width)
    assert torch.allclose(ctl.maps["frog"], expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_restored_exactly_after_exception(family, monkeypatch):
    pipe = tiny_pipeline(family)
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    before = _processors(denoiser)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    # The failure mid-generation: the step callback, PixArt's older per-step `callback`, or for a
    # pipeline with neither (HunyuanVideo 1.5) its scheduler's step
    params = inspect.signature(type(pipe).__call__).parameters
    callback = {name: boom for name in ("callback_on_step_end", "callback") if name in params}
    callback = dict(list(callback.items())[:1])
    if not callback:
        monkeypatch.setattr(type(pipe.scheduler), "step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])):
            _run(pipe, family, **callback)
    after = _processors(denoiser)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    # the hook registry as the same failed run leaves it without attnctl (FLUX's cache contexts make one)
    twin = tiny_pipeline(family)
    with pytest.raises(RuntimeError, match="boom"):
        _run(twin, family, **callback)
    twin_denoiser = twin.unet if family in ("sd", "sdxl") else twin.transformer
    assert hasattr(denoiser, "_diffusers_hook") == hasattr(twin_denoiser, "_diffusers_hook")
    assert "forward" not in vars(denoiser)
    assert "encode_prompt" not in vars(pipe)
    assert "step" not in vars(pipe.scheduler)


def _processors(denoiser):
    """Every attention module's processor (HiDream's transformer has no `attn_processors`)."""
    return {name: m.processor for name, m in attention_modules(denoiser).items()}


def test_steps_and_branches_are_tracked():
    pipe = tiny_pipeline("sd")
    seen = []

    class _Track(AttentionEdit):
        def observe(self, call):
            seen.append((call.session.step, call.session.batch, tuple(call.cond_rows)))

    with attnctl.control(pipe) as ctl:
        ctl.add_edit(ctl.layers[:1], _Track())
        _run(pipe, "sd", num_inference_steps=3)
    assert [s for s, _, _ in seen] == [0, 1, 2]
    batch = seen[0][1]
    assert batch == 2 and all(rows == (1,) for _, _, rows in seen)  # CFG: [uncond, cond]


def test_batch_rows_of_a_batch():
    assert BatchRows.of_batch(4, None, stacked_cfg=True) == BatchRows(uncond=(0, 1), cond=(2, 3))
    assert BatchRows.of_batch(3, None, stacked_cfg=True) == BatchRows(cond=(0, 1, 2))  # odd: not CFG
    assert BatchRows.of_batch(2, None, stacked_cfg=False) == BatchRows(cond=(0, 1))
    assert BatchRows.of_batch(2, "uncond", stacked_cfg=True) == BatchRows(uncond=(0, 1))
    assert BatchRows.of_batch(2, "cond", stacked_cfg=True) == BatchRows(cond=(0, 1))
    rows = BatchRows(uncond=(0,), cond=(1,)).append_perturbed(2)
    assert rows == BatchRows(uncond=(0,), cond=(1,), perturbed=(2, 3)) and rows.size == 4


class _AppendPerturbed(DenoiserWrapper):
    """Test-only wrapper: appends a copy of the conditional rows as perturbed rows, folds them out after."""

    def __init__(self, declare=True):
        self.declare = declare

    def before(self, session, module, args, kwargs):
        args, kwargs = append_rows((args, kwargs), session.cond_rows, session.batch)
        if self.declare:
            session.rows = session.rows.append_perturbed(len(session.rows.cond))
        return args, kwargs

    def after(self, session, module, output):
        prediction, put = denoiser_output(output)
        return put(prediction[: session.rows.size - len(session.rows.perturbed)])


def test_attention_sees_the_rows_a_wrapper_adds():
    pipe = tiny_pipeline("sd")
    base = _output(_run(pipe, "sd"))
    seen = []

    class _Rows(AttentionEdit):
        def observe(self, call):
            seen.append((call.query.shape[0], call.rows))

    with attnctl.control(pipe) as ctl:
        ctl.add_wrapper(_AppendPerturbed())
        ctl.add_edit(ctl.layers[:1], _Rows())
        out = _output(_run(pipe, "sd"))
    assert seen and all(
        batch == 3 and rows == BatchRows(uncond=(0,), cond=(1,), perturbed=(2,)) for batch, rows in seen
    )
    assert torch.allclose(out, base, atol=1e-6)  # the perturbed rows were folded out again


def test_undeclared_rows_are_an_error():
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match=r"_AppendPerturbed made the denoiser batch 3 rows"):
        with attnctl.control(pipe) as ctl:
            ctl.add_wrapper(_AppendPerturbed(declare=False))
            _run(pipe, "sd")
    assert "forward" not in vars(pipe.unet)


def test_denoiser_output_forms():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    sample, new = torch.ones(2), torch.zeros(2)
    prediction, put = denoiser_output((sample,))
    assert prediction is sample and put(new)[0] is new
    prediction, put = denoiser_output(Transformer2DModelOutput(sample=sample))
    assert prediction is sample and put(new).sample is new


def test_step_gating():
    assert in_steps(3, 50) and in_steps(3, 50, steps=[1, 3]) and not in_steps(2, 50, steps=[1, 3])
    assert in_steps(24, 50, first=0.5) and not in_steps(25, 50, first=0.5)  # steps 0-24 of 50
    assert not in_steps(3, 50, steps=[3], first=0.05)


def test_per_generation_values_are_computed_once_per_pipeline_call():
    pipe = tiny_pipeline("sd")
    computed = []
    value = PerGeneration(lambda session: computed.append(session.prompts()) or len(computed))

    class _Read(AttentionEdit):
        def observe(self, call):
            value.get(call.session)

    with attnctl.control(pipe) as ctl:
        ctl.add_edit(ctl.layers, _Read())
        _run(pipe, "sd")
        _run(pipe, "sd", num_images_per_prompt=2)  # the same prompt object, another generation
    assert computed == [[PROMPT], [PROMPT, PROMPT]]


def test_unsupported_pipeline_names_the_families():
    class NotAPipe:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="supported families: Stable Diffusion"):
        with attnctl.control(NotAPipe()):
            pass
    with pytest.raises(ValueError, match="has no denoiser"):
        with attnctl.control(object()):
            pass
    with pytest.raises(TypeError, match="attnctl controls"):
        with attnctl.control(tiny_pipeline("sd"), "maps"):
            pass


def test_unknown_word_raises_with_tokens():
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match="dog"):
        with attnctl.control(pipe, attnctl.AttentionMaps(["dog"])):
            _run(pipe, "sd")
    assert "forward" not in vars(pipe.unet)


def test_maps_grid_png(tmp_path):
    pipe = tiny_pipeline("sd")
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat", "frog"])) as ctl:
        result = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("sd"))
    path = ctl.maps.save_grid(tmp_path / "maps.png", result.images[0])
    from PIL import Image

    img = Image.open(path)
    assert img.width == 3 * 256  # image + two heatmaps
    with pytest.raises(KeyError, match="recorded words"):
        ctl.maps["dog"]


# ---- controls are data --------------------------------------------------------------------------
def test_controls_json_round_trip():
    c = attnctl.AttentionMaps(["cat"], layers=["up_blocks.1", 3], steps=[0, 1], occurrence=-1)
    again = Control.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == attnctl.AttentionMaps(**{k: v for k, v in c.to_dict().items() if k != "kind"})
    assert again.to_dict() == c.to_dict()
    with pytest.raises(ValueError, match="unknown control kind 'Nope'"):
        Control.from_dict({"kind": "Nope"})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"tokens": []}, "tokens"),
        ({"tokens": ["cat", ""]}, "tokens"),
        ({"steps": [-1]}, "steps"),
        ({"occurrence": 1.5}, "occurrence"),
    ],
)
def test_bad_control_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        attnctl.AttentionMaps(**kwargs)


# ---- layer selection ----------------------------------------------------------------------------
def _layers():
    names = [f"blocks.{i}.attn{j}" for i in range(12) for j in (1, 2)]
    return [
        LayerInfo(n, "self" if n.endswith("1") else "cross", 4, ".".join(n.split(".")[:2]), i)
        for i, n in enumerate(names)
    ]


def test_layer_patterns_are_anchored():
    got = [layer.name for layer in LayerSelection(("blocks.1",)).resolve(_layers())]
    assert got == ["blocks.1.attn1", "blocks.1.attn2"]
    got = [layer.name for layer in LayerSelection(("blocks.1*",), kinds=("cross",)).resolve(_layers())]
    assert got == ["blocks.1.attn2", "blocks.10.attn2", "blocks.11.attn2"]
    got = [layer.name for layer in LayerSelection(("*.attn2",)).resolve(_layers())]
    assert len(got) == 12 and all(n.endswith("attn2") for n in got)
    got = [layer.name for layer in LayerSelection((2, "blocks.5.attn1")).resolve(_layers())]
    assert got == ["blocks.2.attn1", "blocks.2.attn2", "blocks.5.attn1"]
    assert (
        str(LayerSelection(("blocks.1",), kinds=("cross",)))
        == "LayerSelection(layers=['blocks.1'], kinds=['cross'])"
    )


def test_resolved_layers_carry_their_heads():
    chosen = LayerSelection(("blocks.1",), heads=(0, 2)).resolve(_layers())
    assert [(layer.name, layer.selected_heads) for layer in chosen] == [
        ("blocks.1.attn1", (0, 2)),
        ("blocks.1.attn2", (0, 2)),
    ]
    assert all(isinstance(layer, SelectedLayer) and isinstance(layer, LayerInfo) for layer in chosen)
    assert chosen[0].heads == 4 and chosen[0].block == "blocks.1"  # the LayerInfo fields as they were
    assert all(layer.selected_heads is None for layer in LayerSelection(("blocks.1",)).resolve(_layers()))
    with attnctl.control(tiny_pipeline("sd")) as ctl:
        layer = ctl.select("up_blocks.0", kinds=("cross",), heads=[1])[0]
        assert layer.selected_heads == (1,) and layer.name.startswith("up_blocks.0.")


def test_layer_selection_errors_list_available_layers():
    with pytest.raises(
        ValueError,
        match=r"^layers=\[.blocks\.99.\] is not allowed: no attention layer matches; [^\n]*blocks\.11\.attn2",
    ):
        LayerSelection(("blocks.99",)).resolve(_layers())
    with pytest.raises(ValueError, match="^kinds="):
        LayerSelection(kinds=("sideways",))
    with pytest.raises(ValueError, match="^heads="):
        LayerSelection(heads=(7,)).resolve(_layers())
    with pytest.raises(ValueError, match="^layers=99"):
        LayerSelection((99,)).resolve(_layers())
    with pytest.raises(ValueError) as err:  # a control's layers of the wrong kind: one line, its kinds
        with attnctl.control(tiny_pipeline("sd"), attnctl.PAG(["attn2"])):
            pass
    message = str(err.value)
    assert message.startswith("layers=['attn2'] is not allowed: no self or joint attention layer matches")
    assert "\n" not in message and "LayerSelection" not in message and "mid_block" in message


def test_real_unet_layer_names_resolve():
    with attnctl.control(tiny_pipeline("sd")) as ctl:
        cross = ctl.select(None, kinds=("cross",))
        assert cross and all(layer.name.endswith("attn2") for layer in cross)
        assert ctl.select("up_blocks.0", kinds=("cross",))


def test_attention_backend_settings_restored():
    pipe = tiny_pipeline("flux")
    procs = list(pipe.transformer.attn_processors.values())
    before = [(vars(p).get("_attention_backend"), vars(p).get("_parallel_config")) for p in procs]
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])):
        pipe.transformer.set_attention_backend("native")  # a change made inside the block
    after = [(vars(p).get("_attention_backend"), vars(p).get("_parallel_config")) for p in procs]
    assert after == before
    assert all(
        pipe.transformer.attn_processors[k] is p
        for k, p in zip(pipe.transformer.attn_processors, procs, strict=True)
    )


def test_denoiser_arguments_are_read_by_name_even_when_positional():
    pipe = tiny_pipeline("sd3")
    cfg = pipe.transformer.config
    latent = torch.randn(1, cfg.in_channels, 8, 8)
    text = torch.randn(1, 5, cfg.joint_attention_dim)
    pooled = torch.randn(1, cfg.pooled_projection_dim)
    with attnctl.control(pipe) as ctl, torch.no_grad():
        pipe.transformer(latent, text, pooled, torch.tensor([321.0]))  # forward(hidden_states, ..., timestep)
        assert ctl.timestep == 321.0 and ctl.text_len == 5 and ctl.batch == 1
        assert ctl.grid == (1, 8 // cfg.patch_size, 8 // cfg.patch_size)
