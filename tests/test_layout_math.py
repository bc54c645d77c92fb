"""Layout math: boxes on grids, priority owners, and grouped attention against an explicit masked
softmax (the tests may build N x N masks; the method never does)."""

from __future__ import annotations

import pytest
import torch

from attnctl.families.base import sdpa
from attnctl.processors.layout_math import (
    TextLayout,
    box_cells,
    grouped_attention,
    owners,
    pixel_masks,
    plain_plan,
    regional_plan,
)


def test_box_cells_sample_cell_centres_at_any_grid():
    cells = box_cells((0.0, 0.0, 0.5, 0.25), 4, 8).view(4, 8)
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[:1, :4] = True
    assert torch.equal(cells, expected)
    # the same box on a finer, non-square grid
    fine = box_cells((0.0, 0.0, 0.5, 0.25), 8, 6).view(8, 6)
    assert fine[:2, :3].all() and fine.sum() == 6
    # a box smaller than one cell keeps the cell under its centre
    tiny = box_cells((0.30, 0.30, 0.32, 0.32), 4, 4).view(4, 4)
    assert tiny.sum() == 1 and tiny[1, 1]


def test_owners_follow_priority_not_order():
    left, right = (0.0, 0.0, 0.75, 1.0), (0.25, 0.0, 1.0, 1.0)
    low_first = owners([left, right], [0, 1], 1, 4)
    assert low_first.tolist() == [0, 1, 1, 1]  # the overlap (cells 1-2) goes to the higher priority
    assert owners([left, right], [1, 0], 1, 4).tolist() == [0, 0, 0, 1]
    assert owners([left, right], [0, 0], 1, 4).tolist() == [0, 1, 1, 1]  # ties: the later box
    assert owners([(0.0, 0.0, 0.5, 1.0)], [0], 1, 4).tolist() == [0, 0, -1, -1]


def test_pixel_masks_are_ip_adapter_mask_entries():
    masks = pixel_masks([(0.0, 0.0, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)], 8, 8)
    assert masks.shape == (1, 2, 8, 8)
    assert masks[0, 0, :, :4].eq(1).all() and masks[0, 0, :, 4:].eq(0).all()
    assert masks[0, 1].sum() == 16


def _layout(joint: bool, n_regions: int = 2, region: int = 3, image_first: bool = False) -> TextLayout:
    """3x4 image tokens, a prompt of 5 tokens, region prompts of `region` tokens each. Joint: FLUX's
    order (text, then the image) or SD3's (`image_first`: the image, then the text)."""
    n, base = 12, 5
    text = base + n_regions * region
    if joint:
        image, start = (slice(0, n), n) if image_first else (slice(text, text + n), 0)
        return TextLayout(
            queries=text + n,
            keys=text + n,
            image_q=image,
            image_k=image,
            base=slice(start, start + base),
            regions=[
                slice(start + base + j * region, start + base + (j + 1) * region) for j in range(n_regions)
            ],
        )
    return TextLayout(
        queries=n,
        keys=text,
        image_q=slice(0, n),
        image_k=slice(0, 0),
        base=slice(0, base),
        regions=[slice(base + j * region, base + (j + 1) * region) for j in range(n_regions)],
    )


def _reference(q, k, v, plan):
    bias = plan.bias(slice(0, q.shape[2]), q.dtype, q.device)
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias).softmax(-1) @ v


def _qkv(lay, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, n, 4, generator=g) for n in (lay.queries, lay.keys, lay.keys))


BOXES = [(0.0, 0.0, 0.5, 1.0), (0.25, 0.0, 1.0, 0.67)]


WORDS = [[1, 2], [4]]  # each region's own words, positions in the prompt


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize(
    "crop_merge, words, hide, n_region_tokens",
    [(True, WORDS, True, 3), (True, WORDS, False, 3), (True, WORDS, True, 0), (False, None, False, 3)],
)  # hiding words is part of crop_merge; 0 region tokens: sub_prompts=False
def test_grouped_attention_equals_the_masked_softmax(joint, crop_merge, words, hide, n_region_tokens):
    lay = _layout(joint, region=n_region_tokens)
    owner = owners(BOXES, [0, 1], 3, 4)
    cells = [owner == j if crop_merge else box_cells(b, 3, 4) for j, b in enumerate(BOXES)]
    q, k, v = _qkv(lay)
    for plan in (plain_plan(lay), regional_plan(lay, owner, cells, words, hide, crop_merge)):
        out = grouped_attention(q, k, v, plan, lambda a, b, c: sdpa(a, b, c, None, None))
        assert torch.allclose(out, _reference(q, k, v, plan), atol=1e-6)


@pytest.mark.parametrize("image_first", [False, True])
@pytest.mark.parametrize("hide", [True, False])
def test_regional_visibility(hide, image_first):
    """crop_merge: in region j's box the text seen is region j's own words of the prompt and its
    tokens only; outside every box the prompt, less every region's words when hidden."""
    lay = _layout(joint=True, image_first=image_first)
    owner = owners(BOXES, [0, 1], 3, 4)
    plan = regional_plan(lay, owner, [owner == j for j in range(2)], WORDS, hide, True)
    seen = plan.visible[plan.group_of]  # [Sq, Sk]
    image = torch.arange(lay.image_q.start, lay.image_q.stop)
    region = [torch.arange(r.start, r.stop) for r in lay.regions]
    words = [[lay.base.start + p for p in w] for w in WORDS]
    base = torch.arange(lay.base.start, lay.base.stop)
    for cell, o in enumerate(owner.tolist()):
        row = seen[image[cell]]
        assert row[image].all()  # every image query sees every image key
        for j in range(2):
            assert bool(row[region[j]].all()) == (o == j)  # its own region's tokens only
            assert bool(row[words[j]].all()) == (o == j or (o < 0 and not hide))
        others = [p for p in base.tolist() if p not in words[0] + words[1]]
        assert bool(row[others].all()) == (o < 0) and bool(row[others].any()) == (o < 0)
    for j in range(2):
        text_row = seen[region[j][0]]
        assert torch.equal(text_row[image], owner == j)  # region tokens see their box
        assert text_row[region[j]].all() and not text_row[lay.base].any()
        assert not text_row[region[1 - j]].any()
    base_row = seen[lay.base.start]
    assert base_row[image].all() and base_row[lay.base].all() and not base_row[region[0]].any()
    plain = plain_plan(lay).visible[plain_plan(lay).group_of]
    assert not plain[image][:, torch.cat(region)].any()  # region tokens unseen by the image


def test_without_region_tokens_a_box_sees_the_prompt_less_the_other_words():
    """sub_prompts=False: no region tokens; a box sees the prompt without the other regions' words."""
    lay = _layout(joint=False, region=0)
    owner = owners(BOXES, [0, 1], 3, 4)
    plan = regional_plan(lay, owner, [owner == j for j in range(2)], WORDS, True, True)
    seen = plan.visible[plan.group_of]
    for cell, o in enumerate(owner.tolist()):
        hidden = {p for j, w in enumerate(WORDS) if j != o for p in w}
        assert seen[cell].tolist() == [p not in hidden for p in range(lay.keys)]


def test_outside_every_box_region_keys_change_nothing():
    lay = _layout(joint=False)
    owner = owners(BOXES[:1], [0], 3, 4)
    plan = regional_plan(lay, owner, [owner == 0], [[1]], True, True)
    q, k, v = _qkv(lay)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, lay.regions[0]] += 5
    v2[:, :, lay.regions[0]] -= 3
    kernel = lambda a, b, c: sdpa(a, b, c, None, None)  # noqa: E731
    a, b = grouped_attention(q, k, v, plan, kernel), grouped_attention(q, k2, v2, plan, kernel)
    outside = (owner < 0).nonzero().flatten()
    assert torch.equal(a[:, :, outside], b[:, :, outside])
    assert not torch.allclose(
        a[:, :, (owner == 0).nonzero().flatten()], b[:, :, (owner == 0).nonzero().flatten()]
    )
