"""attnctl under the ways people run big models: torch.compile, processors changed in the block."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a cat and a frog"


def _run(pipe, family, *controls, **overrides):
    with attnctl.control(pipe, *controls) as ctl:
        out = pipe(
            prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs(family, **overrides)
        )
    return (out.images if hasattr(out, "images") else out.frames), ctl


def test_a_compiled_denoiser_is_controlled_as_the_eager_one():
    """`pipe.transformer = torch.compile(pipe.transformer)`, the usual way: attnctl controls the module
    the wrapper compiles; outputs and maps equal the eager run's. Dynamo compiles once per set of
    controls (the session's hook replaces the module's forward): a second run compiles nothing."""
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline("flux")
    eager, eager_ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]), num_inference_steps=4)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer)
    compiled, ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]), num_inference_steps=4)
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert torch.allclose(ctl.maps["cat"], eager_ctl.maps["cat"], atol=1e-6)
    counters.clear()
    again, _ = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]), num_inference_steps=4)
    assert counters["stats"]["unique_graphs"] == 0 and torch.equal(again, compiled)
    assert "forward" not in vars(pipe.transformer._orig_mod)


@pytest.mark.parametrize("how", ["wrapper", "in place", "repeated blocks"])
def test_fullgraph_compilation_is_refused_at_entry_naming_the_controls(how):
    pipe = tiny_pipeline("flux")
    if how == "wrapper":
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    elif how == "in place":
        pipe.transformer.compile(fullgraph=True)
    else:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    with pytest.raises(
        ValueError, match=r"^AttentionMaps, PAG cannot run in a denoiser compiled with fullgraph=True"
    ):
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"]), attnctl.PAG([0])):
            pass


def test_attention_slicing_enabled_inside_the_block_is_honoured_and_stays():
    """enable_attention_slicing() inside the block: the next denoiser call finds the new processors
    and wraps them, maps are still recorded, and on exit the user's sliced processors remain."""
    pipe = tiny_pipeline("sd")
    plain, plain_ctl = _run(pipe, "sd", attnctl.AttentionMaps(["cat"]))
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        pipe.enable_attention_slicing()
        out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("sd")).images
    assert torch.allclose(out, plain, atol=1e-5)
    assert torch.allclose(ctl.maps["cat"], plain_ctl.maps["cat"], atol=1e-6)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}


def test_a_processor_attnctl_cannot_read_set_inside_the_block_is_one_error_and_stays():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tiny_pipeline("flux")
    with pytest.raises(
        ValueError, match="changed inside attnctl.control to AttnProcessor2_0, which attnctl cannot"
    ):
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])):
            pipe.transformer.set_attn_processor(AttnProcessor2_0())
            pipe(prompt=PROMPT, **tiny_call_kwargs("flux"))
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"AttnProcessor2_0"}


def test_the_familys_own_processor_set_inside_the_block_is_wrapped():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    pipe = tiny_pipeline("flux")
    plain, plain_ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]))
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        pipe.transformer.set_attn_processor(FluxAttnProcessor())
        out = pipe(
            prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("flux")
        ).images
    assert torch.equal(out, plain) and torch.equal(ctl.maps["cat"], plain_ctl.maps["cat"])
    assert all(type(p) is FluxAttnProcessor for p in pipe.transformer.attn_processors.values())


def _cache_config(name, pipe, family):
    import diffusers

    timestep = lambda: pipe.current_timestep  # noqa: E731
    return {
        "FirstBlockCache": lambda: diffusers.FirstBlockCacheConfig(threshold=0.2),
        "TaylorSeerCache": lambda: diffusers.TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1
        ),
        "PyramidAttentionBroadcast": lambda: diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep,
        ),
        "FasterCache": lambda: diffusers.FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep,
            attention_weight_callback=lambda _: 0.5,
            tensor_format="BFCHW",
        ),
        "MagCache": lambda: diffusers.MagCacheConfig(num_inference_steps=4, mag_ratios=[1.0] * 4),
    }[name]()


# FasterCache runs in diffusers 0.42.1 on CogVideoX, not on the tiny FLUX or Wan (it fails there
# without attnctl too), so it is checked on CogVideoX.
CACHE_CASES = [
    (family, cache)
    for cache in ("FirstBlockCache", "TaylorSeerCache", "PyramidAttentionBroadcast", "MagCache")
    for family in ("flux", "wan")
] + [("cogvideox", "FasterCache")]


@pytest.mark.parametrize("family, cache", CACHE_CASES)
def test_every_method_works_with_each_cache_or_is_refused_at_entry(family, cache):
    """Each method with each of diffusers' caches either runs (maps record the steps the cache
    computes; attention edits act on the blocks it runs) or is refused at entry with the pair named."""
    from attnctl.families import adapter_for
    from attnctl.families.support import INTEROP, METHODS, SUPPORTED, status

    pipe = tiny_pipeline(family)
    pipe.transformer.enable_cache(_cache_config(cache, pipe, family))
    with attnctl.control(pipe) as probe:
        perturbable = next(x for x in probe.layers if x.kind in ("self", "joint")).name
    controls = {
        "AttentionMaps": attnctl.AttentionMaps(["cat"]),
        "AttentionRegulation": attnctl.AttentionRegulation(["cat", "frog"]),
        "AttendAndExcite": attnctl.AttendAndExcite(["cat", "frog"]),
        "AStar": attnctl.AStar(["cat", "frog"]),
        "SoftPAG": attnctl.SoftPAG({perturbable: [0]}),
        "PAG": attnctl.PAG([perturbable]),
        "Layout": attnctl.Layout([attnctl.Region([0, 0, 0.5, 1], "a cat")]),
        "DraftAttention": attnctl.DraftAttention(sparsity=0.5, pool=(1, 1), dense_steps=0.0),
    }
    adapter = adapter_for(pipe.transformer)
    ran = 0
    for method in METHODS:
        if status(adapter, method)[0] != SUPPORTED:
            continue
        if method in INTEROP[cache]:
            with pytest.raises(ValueError, match=f"^{method} does not work with {cache}: "):
                with attnctl.control(pipe, controls[method]):
                    pass
            continue
        out, ctl = _run(pipe, family, controls[method], num_inference_steps=4)
        assert torch.isfinite(torch.as_tensor(out)).all(), method
        if method == "AttentionMaps":
            assert ctl.maps["cat"].sum() > 0
        ran += 1
    assert ran >= 1


@pytest.mark.parametrize("fused", [False, True])
def test_lora_adapted_projections_are_what_maps_and_controls_see(fused):
    """A LoRA on q, k, v (peft, through diffusers' add_adapter), active or fused into the weights:
    maps equal the explicit softmax over the adapted q and k, observing leaves the output as the
    adapted model makes it, and SoftPAG guides the adapted model."""
    pytest.importorskip("peft", reason="peft is in the dev extra")
    from peft import LoraConfig
    from test_families import _explicit_map, _kernel_calls

    from attnctl.families import adapter_for
    from attnctl.tiny import video_tokens

    pipe = tiny_pipeline("flux")
    before, _ = _run(pipe, "flux")
    pipe.transformer.add_adapter(
        LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    if fused:
        pipe.transformer.fuse_lora()
    adapted, _ = _run(pipe, "flux")
    assert not torch.allclose(adapted, before, atol=1e-4)  # the LoRA acts
    layer = "transformer_blocks.0.attn"
    with _kernel_calls(pipe, "flux", layer) as calls:
        _run(pipe, "flux", num_inference_steps=1)
    out, ctl = _run(pipe, "flux", attnctl.AttentionMaps(["frog"], layers=[layer]), num_inference_steps=1)
    positions = adapter_for(pipe.transformer).text_positions(pipe, PROMPT, "frog")
    expected = _explicit_map(calls, "flux", positions, video_tokens("flux"))
    assert torch.allclose(ctl.maps["frog"].flatten(), expected, atol=1e-5)
    observed, _ = _run(pipe, "flux", attnctl.AttentionMaps(["frog"]))
    assert torch.equal(observed, adapted)
    guided, _ = _run(pipe, "flux", attnctl.SoftPAG({layer: [0]}, u=1.0, scale=3.0))
    assert torch.isfinite(guided).all() and not torch.equal(guided, adapted)


OFFLOADS = ("model_cpu_offload", "group_offload_block", "group_offload_leaf")


def _offload(pipe, how):
    cpu = torch.device("cpu")
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    if how == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device="cpu")
    elif how == "group_offload_block":
        denoiser.enable_group_offload(
            cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
        )
    elif how == "group_offload_leaf":
        denoiser.enable_group_offload(cpu, offload_device=cpu, offload_type="leaf_level")
    else:
        pipe.to(torch.bfloat16)


@pytest.mark.parametrize("family", ["sd", "flux", "wan"])
@pytest.mark.parametrize("how", [*OFFLOADS, "bfloat16"])
def test_every_method_runs_under_offload_and_bfloat16(family, how):
    """Model CPU offload and group offload (block and leaf; CPU to CPU here, what diffusers allows
    without a GPU) give every supported method the outputs it gives without offloading; in bfloat16
    every method runs to a finite image. The offload hooks survive the session."""
    from attnctl.families import adapter_for
    from attnctl.families.support import METHODS, SUPPORTED, status

    plain_pipe, pipe = tiny_pipeline(family), tiny_pipeline(family)
    _offload(pipe, how)
    with attnctl.control(pipe) as probe:
        perturbable = next(x for x in probe.layers if x.kind in ("self", "joint")).name
    controls = {
        "AttentionMaps": lambda: attnctl.AttentionMaps(["cat"]),
        "AttentionRegulation": lambda: attnctl.AttentionRegulation(["cat", "frog"]),
        "AttendAndExcite": lambda: attnctl.AttendAndExcite(["cat", "frog"]),
        "AStar": lambda: attnctl.AStar(["cat", "frog"]),
        "SoftPAG": lambda: attnctl.SoftPAG({perturbable: [0]}),
        "PAG": lambda: attnctl.PAG([perturbable]),
        "Layout": lambda: attnctl.Layout([attnctl.Region([0, 0, 0.5, 1], "a cat")]),
        "DraftAttention": lambda: attnctl.DraftAttention(sparsity=0.5, pool=(1, 1), dense_steps=0.0),
    }
    adapter = adapter_for(getattr(pipe, "transformer", None) or pipe.unet)
    for method in (m for m in METHODS if status(adapter, m)[0] == SUPPORTED):
        out, _ = _run(pipe, family, controls[method]())
        assert torch.isfinite(out.float()).all(), method
        if how != "bfloat16":
            expected, _ = _run(plain_pipe, family, controls[method]())
            assert torch.allclose(out, expected, atol=1e-5), method
    if how != "bfloat16":
        plain, _ = _run(pipe, family)
        assert torch.allclose(plain, _run(plain_pipe, family)[0], atol=1e-5)  # offloading still works


def test_docs_show_the_generated_works_with_table():
    """The docs site's families page builds its 'works with' table from the registry (never a copy)."""
    import sys
    from pathlib import Path

    from attnctl.families.support import interop_markdown

    docs = Path(__file__).parent.parent / "docs"
    assert "{{ interop_table }}" in (docs / "families.md").read_text()
    sys.path.insert(0, str(docs))
    try:
        import hooks
    finally:
        sys.path.remove(str(docs))
    page = hooks.on_page_markdown((docs / "families.md").read_text())
    assert interop_markdown() in page and "{{" not in page


def test_compile_repeated_blocks_keeps_working():
    """diffusers' regional compilation (each repeated block compiled) under control: as eager."""
    pipe = tiny_pipeline("flux")
    eager, eager_ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]), attnctl.PAG([0]))
    torch._dynamo.reset()
    pipe.transformer.compile_repeated_blocks()
    compiled, ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]), attnctl.PAG([0]))
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert torch.allclose(ctl.maps["cat"], eager_ctl.maps["cat"], atol=1e-6)


def test_qkv_projections_fused_inside_the_block_are_followed():
    """fuse_qkv_projections() inside the block: the model's own processors compute q, k, v from the
    fused projection, and attnctl takes them at the kernel as before."""
    pipe = tiny_pipeline("flux")
    plain, plain_ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]))
    with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
        pipe.transformer.fuse_qkv_projections()
        out = pipe(
            prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("flux")
        ).images
    assert pipe.transformer.transformer_blocks[0].attn.fused_projections
    assert torch.allclose(out, plain, atol=1e-5)
    assert torch.allclose(ctl.maps["cat"], plain_ctl.maps["cat"], atol=1e-5)


def test_lora_loaded_with_load_lora_weights_is_what_controls_see(tmp_path):
    """A LoRA saved with save_lora_weights and loaded with load_lora_weights (diffusers' own path):
    observing leaves the adapted output as it is, and maps differ from the base model's."""
    pytest.importorskip("peft", reason="peft is in the dev extra")
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = tiny_pipeline("flux")
    source.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    FluxPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(source.transformer)
    )
    pipe = tiny_pipeline("flux")
    base, base_ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]))
    pipe.load_lora_weights(tmp_path)
    adapted = pipe(
        prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_call_kwargs("flux")
    ).images
    observed, ctl = _run(pipe, "flux", attnctl.AttentionMaps(["cat"]))
    assert torch.equal(observed, adapted) and not torch.allclose(adapted, base, atol=1e-4)
    assert not torch.allclose(ctl.maps["cat"], base_ctl.maps["cat"], atol=1e-6)
