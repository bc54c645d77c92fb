"""attend(): how the edits of one attention call compose (kernel, logits, output mix, observer)."""

from __future__ import annotations

import types

import pytest
import torch

import attnctl
from attnctl.core.attention import AttentionCall, AttentionEdit, attend
from attnctl.core.denoiser import BatchRows
from attnctl.families.base import LayerInfo, Layout, Prepared, sdpa
from attnctl.tiny import tiny_call_kwargs, tiny_pipeline

ROWS = BatchRows(uncond=(0,), cond=(1,), perturbed=(2,))


def _call():
    """A self-attention call of 3 rows (uncond, cond, perturbed), 2 heads, 6 tokens."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 4, generator=g) for _ in range(3))
    layout = Layout(image_q=slice(0, 6), image_k=slice(0, 6), text_k=None, frames=1, height=2, width=3)
    layer = LayerInfo("blocks.0.attn1", "self", 2, "blocks.0", 0)
    prepared = Prepared(q, k, v, layout, finish=lambda out: out)
    return AttentionCall(types.SimpleNamespace(rows=ROWS), layer, prepared, sdpa)


class _Mix(AttentionEdit):
    """SoftPAG's form of mix: O' = (1 - u)·O + u·V on head 1 of the given rows."""

    def __init__(self, rows, u=0.25):
        self.rows, self.u, self.seen = list(rows), u, None

    def mix_output(self, call, out):
        self.seen = out.clone()
        out = out.clone()
        out[self.rows, 1] = (1 - self.u) * out[self.rows, 1] + self.u * call.value[self.rows, 1]
        return out


class _Kernel(AttentionEdit):
    def kernel(self, call):
        return 2 * call.value  # any kernel but the model's own


class _Observer(AttentionEdit):
    def __init__(self, columns=None):
        self.calls, self.columns, self.seen = 0, columns, None

    def observe(self, call):
        self.calls += 1
        if self.columns is not None:
            self.seen = call.text_probs(self.columns)


def _mixed(out, value, rows, u=0.25):
    out = out.clone()
    out[rows, 1] = (1 - u) * out[rows, 1] + u * value[rows, 1]
    return out


def test_mix_applies_to_a_kernel_edits_output_and_observers_still_run():
    call, mix, observer = _call(), _Mix(ROWS.perturbed), _Observer()
    out = attend(call, [mix, _Kernel(), observer])  # the mix listed first still runs after the kernel
    assert torch.equal(mix.seen, 2 * call.value)
    assert torch.equal(out, _mixed(2 * call.value, call.value, [2]))
    assert observer.calls == 1


def _joint_call(masked: bool):
    """A joint call of 2 rows (uncond, cond), 2 heads, [text (3) ; image (2 x 3)] tokens; with
    `masked`, the last text key hidden by an additive mask."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g) for _ in range(3))
    layout = Layout(image_q=slice(3, 9), image_k=slice(3, 9), text_k=slice(0, 3), frames=1, height=2, width=3)
    layer = LayerInfo("blocks.0.attn", "joint", 2, "blocks.0", 0)
    mask = None
    if masked:
        mask = torch.zeros(1, 1, 1, 9)
        mask[..., 2] = float("-inf")
    prepared = Prepared(q, k, v, layout, finish=lambda out: out, mask=mask)
    rows = BatchRows(uncond=(0,), cond=(1,))
    return AttentionCall(types.SimpleNamespace(rows=rows), layer, prepared, sdpa)


class _TextEdit(AttentionEdit):
    """Biases the text logits, then puts the first text key's probability back (AR's form)."""

    def logit_bias(self, call, logits):
        return logits + torch.tensor([1.5, -0.5, 2.0])

    def post_softmax(self, call, probs, unedited):
        probs = probs.clone()
        probs[..., 0] = unedited[..., 0]
        return probs


@pytest.mark.parametrize("masked", [False, True])
def test_text_column_edits_equal_the_explicit_softmax(masked):
    """Logit and probability edits change the output through the text columns and the rows'
    softmax denominators only; the result equals the whole edited softmax, computed explicitly."""
    call, observer = _joint_call(masked), _Observer([0, 1])
    out = attend(call, [_TextEdit(), observer])
    q, k, v = call.query[1], call.key[1], call.value[1]
    logits = q @ k.transpose(-1, -2) * call.scale + (0 if call.mask is None else call.mask[0])
    unedited = logits.softmax(-1)
    logits[:, 3:, :3] += torch.tensor([1.5, -0.5, 2.0])
    probs = logits.softmax(-1)
    probs[:, 3:, 0] = unedited[:, 3:, 0]
    assert torch.allclose(out[1], probs @ v, atol=1e-5)
    plain = sdpa(call.query, call.key, call.value, call.mask, None)
    assert torch.equal(out[0], plain[0])  # the unconditional row: the kernel's output
    assert torch.equal(out[1, :, :3], plain[1, :, :3])  # text queries are not edited
    # what observers read: the edited probabilities
    assert torch.allclose(observer.seen, probs[:, 3:, :2].mean(0)[None], atol=1e-6)


def test_mix_sees_the_logit_edited_conditional_rows():
    call, mix = _joint_call(False), _Mix([1])
    out = attend(call, [mix, _TextEdit()])
    expected = attend(_joint_call(False), [_TextEdit()])
    assert torch.equal(mix.seen, expected)
    assert torch.allclose(out, _mixed(expected, call.value, [1]))


class _NoMix(AttentionEdit):
    def __init__(self):
        self.calls = []

    def mix_output(self, call, out):
        self.calls.append((call.session.step, call.layer.block))
        return out


@pytest.mark.parametrize("family", ["sd", "flux", "wan"])
def test_noop_mix_is_bit_identical(family):
    pipe = tiny_pipeline(family)

    def run():
        result = pipe(
            "a cat and a frog", generator=torch.Generator().manual_seed(0), **tiny_call_kwargs(family)
        )
        return torch.as_tensor(result.images if hasattr(result, "images") else result.frames)

    base = run()
    noop = _NoMix()
    with attnctl.control(pipe) as ctl:
        ctl.add_edit(ctl.layers, noop)
        out = run()
    assert noop.calls and torch.equal(out, base)


def test_noop_mix_composes_with_draft_attention_and_maps():
    pipe = tiny_pipeline("wan")
    kwargs = tiny_call_kwargs("wan", num_inference_steps=4, height=64, width=64)
    controls = (attnctl.DraftAttention(sparsity=0.5, pool=(1, 2)), attnctl.AttentionMaps(["cat"]))

    def run(*edits):
        with attnctl.control(pipe, *controls) as ctl:
            for edit in edits:
                ctl.add_edit([layer for layer in ctl.layers if layer.kind == "self"], edit)
            frames = pipe("a cat and a frog", generator=torch.Generator().manual_seed(0), **kwargs).frames
        return frames, ctl.maps["cat"]

    base, base_map = run()
    noop = _NoMix()
    out, out_map = run(noop)
    # it ran on calls that DraftAttention made sparse: past the first quarter of steps, after block 0
    assert any(step >= 1 and block != "blocks.0" for step, block in noop.calls)
    assert torch.equal(out, base) and torch.equal(out_map, base_map)


class _HideLastKeys(AttentionEdit):
    """Hides the last two keys from query positions 0-2, through a per-block key bias."""

    def key_bias(self, call, rows, queries):
        bias = torch.zeros(len(rows), 1, 6, 6)
        bias[:, :, :3, 4:] = float("-inf")
        return bias[:, :, queries]


def test_key_bias_enters_explicit_logits_and_text_probs():
    call = _call()
    call.layout = Layout(
        image_q=slice(0, 6), image_k=slice(0, 0), text_k=slice(0, 6), frames=1, height=2, width=3
    )
    call.edits = [_HideLastKeys()]
    logits = call.text_logits([1])
    assert torch.isinf(logits[0, :, :3, 4:]).all() and torch.isfinite(logits[0, :, 3:]).all()
    probs = call.text_probs([4, 5, 0])
    assert torch.equal(probs[0, :3, :2], torch.zeros(3, 2))
    expected = (logits.softmax(-1).mean(1))[0][:, [4, 5, 0]]
    assert torch.allclose(probs[0], expected, atol=1e-6)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_recording_leaves_no_reference_cycle_holding_tensors(family):
    """Each call's q, k, v and hidden states are freed when the call returns (not at Python's next
    cyclic collection): the only tensors in reference cycles afterwards are the recorded maps."""
    import gc

    pipe = tiny_pipeline(family)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with attnctl.control(pipe, attnctl.AttentionMaps(["cat"])) as ctl:
            pipe("a cat and a frog", **tiny_call_kwargs(family))
        gc.collect()
        cyclic = [o for o in gc.garbage if type(o) is torch.Tensor]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    recorded = {id(t) for sums in ctl.maps._sums.values() for t in sums.values()}
    assert {id(t) for t in cyclic} <= recorded


def test_text_probs_gradients_equal_the_explicit_softmax():
    """Latent guidance differentiates through text_probs: the chunked log-sum-exp's backward, which
    recomputes each chunk's probabilities, gives the gradients of the explicit softmax."""
    call = _joint_call(masked=True)
    call.query.requires_grad_(True)
    call.key.requires_grad_(True)
    probs = call.text_probs([0, 1])
    weights = torch.linspace(1, 2, probs.numel()).view_as(probs)
    (probs * weights).sum().backward()
    got = call.query.grad.clone(), call.key.grad.clone()

    q, k = (x.detach().clone().requires_grad_(True) for x in (call.query, call.key))
    logits = q[[1]] @ k[[1]].transpose(-1, -2) * call.scale + call.mask
    explicit = logits.softmax(-1)[:, :, 3:, :2].mean(1)
    (explicit * weights).sum().backward()
    assert torch.allclose(probs, explicit, atol=1e-6)
    assert torch.allclose(got[0], q.grad, atol=1e-5) and torch.allclose(got[1], k.grad, atol=1e-5)


def test_chunked_denominators_over_several_chunks(monkeypatch):
    """The chunked log-sum-exp and its backward, in chunks of 5 query rows (the last one of 2) with a
    bias: the explicit computation's values and gradients."""
    from attnctl.core import attention

    torch.manual_seed(0)
    q = torch.randn(2, 3, 37, 8, requires_grad=True)
    k = torch.randn(2, 3, 45, 8, requires_grad=True)
    bias = torch.randn(2, 1, 37, 45)
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 2 * 3 * 45 * 5)
    lse = attention._ChunkedLSE.apply(q, k, 0.3, lambda start, stop: bias[:, :, start:stop])
    weights = torch.randn(lse.shape)
    got = torch.autograd.grad((lse * weights).sum(), (q, k))
    explicit = ((q @ k.transpose(-1, -2)) * 0.3 + bias).logsumexp(-1)
    expected = torch.autograd.grad((explicit * weights).sum(), (q, k))
    assert torch.allclose(lse, explicit, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected, strict=True))
