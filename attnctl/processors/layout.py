"""Layout: regional prompts and subject images confined to boxes (AnyMS, Yu et al., "Bottom-up
Attention Decoupling for Layout-guided and Training-free Multi-subject Customization",
arXiv 2512.23537; regional prompting as in InstantX's and diffusers' community pipelines).

Region prompts are encoded with the pipeline's own `encode_prompt` and appended to the text sequence
of every denoiser call; in the layers and steps the layout acts on, the text attention of image
queries inside a region's box is that region's alone (its words of the prompt and its prompt's
tokens, one softmax: the region's stream replaces the prompt's there, as AnyMS's crop-and-merge
writes a subject's stream into its box), queries outside every box see the prompt (less the
regions' words), overlaps go to the higher priority. Everywhere else (other layers and steps, the
unconditional rows) the region tokens are unseen and attention is the model's own. On joint
attention (SD3, FLUX) the region tokens are also queries: they see their own prompt and the image
tokens of their box. Subject images go through a loaded IP-Adapter: Z = Z_text + Z_image with
Z_image = scale_j * softmax(Q K_jᵀ/√d) V_j written into subject j's box only (crop-and-merge).
`mode="mask_and_sum"` instead adds every stream under its mask: for subjects exactly diffusers'
`ip_adapter_masks`, for prompts Z_prompt + Σ_j scale_j · mask_j ⊙ Z_j.
Attention runs per query group on the model's own kernel (`layout_math`): never an N x N mask.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import torch

from ..core.attention import AttentionCall, AttentionEdit
from ..core.controls import Control, _in_range, check, check_number, param, shown
from ..core.denoiser import DenoiserWrapper
from ..core.session import PerGeneration, in_steps
from ..core.tokens import TokenNotFoundError
from ..families.base import LayerInfo
from .layout_math import (
    Plan,
    TextLayout,
    box_cells,
    grouped_attention,
    key_columns,
    owners,
    pixel_masks,
    plain_plan,
    put,
    regional_plan,
    take,
)

MODES = ("crop_merge", "mask_and_sum")
BASE_OUTSIDE = ("auto", "all", "other_regions")
REGION_TOKENS = ("words", "span", "all")
BOX_RULE = "(x0, y0, x1, y1) normalised to the image, with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"


@dataclasses.dataclass
class Region:
    """A box of the image and what belongs there: a sub-prompt, a subject image, or both.

    box: (x0, y0, x1, y1), normalised (0 = left / top, 1 = right / bottom), any aspect ratio.
    prompt: text for this box, encoded with the pipeline's own text encoder.
    image: path of a subject image, given to the pipeline's IP-Adapter (UNet pipelines).
    priority: where boxes overlap, the higher priority owns the overlap (ties: the later region).
    scale: weight of this region's streams (0: no effect; 1: the method's full effect).
    """

    box: tuple[float, float, float, float]
    prompt: str | None = None
    image: str | None = None
    priority: int = 0
    scale: float = 1.0

    def __post_init__(self) -> None:
        box = self.box
        ok = isinstance(box, (list, tuple)) and len(box) == 4
        ok = ok and all(_in_range(v, False, None, None) for v in box)  # finite numbers
        check(ok, "box", box, BOX_RULE)
        x0, y0, x1, y1 = (float(v) for v in box)
        for name, good in (("x0 < x1", x0 < x1), ("y0 < y1", y0 < y1)):
            check(good, "box", box, f"{BOX_RULE} ({name} fails)")
        inside = all(0 <= v <= 1 for v in (x0, y0, x1, y1))
        check(inside, "box", box, f"{BOX_RULE} (a coordinate lies outside [0, 1])")
        self.box = (x0, y0, x1, y1)
        check(
            self.prompt is not None or self.image is not None,
            "prompt",
            None,
            "a region needs a prompt, an image, or both",
        )
        if self.prompt is not None:
            check(
                isinstance(self.prompt, str) and bool(self.prompt.strip()),
                "prompt",
                self.prompt,
                "non-empty text",
            )
        if self.image is not None:
            check(
                isinstance(self.image, str) and Path(self.image).is_file(),
                "image",
                self.image,
                "the path of an image file",
            )
        check_number("priority", self.priority, integer=True)
        check_number("scale", self.scale, low=0)

    def to_dict(self) -> dict[str, Any]:
        """The region as plain JSON data (`Region.from_dict` reads it)."""
        return {**dataclasses.asdict(self), "box": list(self.box)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        """The region a `to_dict()` describes; an unknown or missing key is an error naming it."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ValueError(
                f"a region has no field {', '.join(map(shown, unknown))}; its fields: {', '.join(names)}"
            )
        check("box" in data, "box", None, f"a region's box {BOX_RULE}")
        return cls(**data)


@dataclasses.dataclass
class Layout(Control):
    """Confine region prompts and subject images to boxes.

    regions: `Region`s (or their dicts).
    base_prompt_weight: share of the plain prompt-only attention kept where regions act (regional
        prompting tools' "base ratio"): out = w·plain + (1 - w)·regional; 0 = the regional scheme.
    layers: layer paths or block indices to act on (None: every text-attending layer, as AnyMS
        applies it to every cross-attention layer; e.g. every other FLUX block by index).
    steps: denoising step indices to act on (None: every step).
    prompt_fraction: region prompts act on the first fraction of those steps only (1: all of them;
        with steps=[10, ..., 19] and 0.3: steps 10-12);
        subject images are kept to their boxes at every one (unconfined, a subject's stream would
        spread its identity over the image). An image's layout forms in the early steps; held to
        the end, hard boxes also cut objects' edges and erase what crosses them (`attnctl bench
        layout`: 0.3 puts 91.5% of two-object prompts' objects in their boxes, 1.0 77.0%; three-object
        images with every object drawn: 80% against 40%).
    mode: "crop_merge": in a region's box the region's text stream replaces the prompt's (AnyMS's
        crop-and-merge; overlaps by priority): queries there see the region's own words of the
        prompt and its prompt's tokens, and none of the prompt's other tokens; "mask_and_sum": each
        region's stream added under its hard mask to the prompt's (for subjects diffusers'
        `ip_adapter_masks` exactly).
    base_outside: what of the prompt a query outside every box sees: "all", or "other_regions":
        the prompt without the regions' own words (those of a region's prompt found in the prompt and
        in no other region's prompt; crop_merge only; with sub_prompts=False, also what a box sees
        of the other regions). "auto": other_regions with crop_merge, all with mask_and_sum. Where
        the prompt names a region's object ("a cat and a frog" with a box for "a cat"), hiding its
        words outside the box is what confines it: with "all", queries there still read "cat".
    region_tokens: which tokens of a region prompt's encoding are appended: "words" (its words
        only), "span" (its start-of-text, words and end-of-text: `prompt_span`) or "all" (the
        encoder's whole padded sequence). Start and end tokens are attention sinks: in a box that
        sees them, most of the attention goes to them and not to the words (`attnctl bench layout`:
        "span" puts 7.0% of two-object prompts' objects in their boxes against 91.5% with "words").
    sub_prompts: whether region prompts' tokens are appended at all. False (with
        base_outside="other_regions") confines objects by hiding words of the prompt alone: queries
        in a box see the prompt less the other regions' words.
    """

    regions: list[Region] = param(
        kind="regions", default_factory=list, help="Boxes with a sub-prompt and/or a subject image."
    )
    base_prompt_weight: float = param(
        0.0,
        low=0,
        high=1,
        help="Share of plain prompt-only attention kept where regions act (0: regional only).",
    )
    layers: list[str | int] | None = param(
        None,
        kind="layers",
        optional=True,
        help="Layer paths or block indices (None: every text-attending layer).",
    )
    steps: list[int] | None = param(
        None, kind="steps", optional=True, help="Denoising step indices to act on (None: every step)."
    )
    prompt_fraction: float = param(
        0.3,
        low=0,
        high=1,
        low_open=True,
        help="Region prompts act on the first fraction of the steps (1: every step).",
    )
    mode: str = param(
        "crop_merge",
        choices=MODES,
        help="crop_merge (in its box a region's text replaces the prompt's, by priority) or mask_and_sum.",
    )
    base_outside: str = param(
        "auto",
        choices=BASE_OUTSIDE,
        help="What of the prompt a query outside every box sees: all, other_regions (the prompt without "
        "the regions' words; crop_merge) or auto (other_regions with crop_merge).",
    )
    sub_prompts: bool = param(True, help="Append region prompts' tokens (False: only hide words outside).")
    region_tokens: str = param(
        "words",
        choices=REGION_TOKENS,
        help="Which tokens of a region prompt's encoding are appended: words, span (start, words and "
        "end tokens) or all (its padding too).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.regions, (list, tuple)):
            self.regions = [Region.from_dict(r) if isinstance(r, dict) else r for r in self.regions]
        super().__post_init__()

    def validate(self) -> None:
        check(
            all(isinstance(r, Region) for r in self.regions),
            "regions",
            self.regions,
            "a non-empty list of Region",
        )
        check(
            self.base_outside != "other_regions" or self.mode == "crop_merge",
            "base_outside",
            self.base_outside,
            "'all' or 'auto' with mode='mask_and_sum' (hiding words is part of crop_merge)",
        )
        check(
            self.sub_prompts or self.hides_words,
            "sub_prompts",
            self.sub_prompts,
            "True unless base_outside='other_regions' (else region prompts would have no effect)",
        )

    @property
    def hides_words(self) -> bool:
        """Whether queries outside a region's box lose that region's words of the prompt."""
        return self.base_outside == "other_regions" or (
            self.base_outside == "auto" and self.mode == "crop_merge"
        )

    def install(self, session: Any) -> None:
        layouts = sum(isinstance(c, Layout) for c in session.controls)
        if layouts > 1:
            raise ValueError(
                f"{layouts} Layouts in one control() are not allowed: one Layout, with every region in it "
                "(each Layout would append its own region prompts)"
            )
        acting = session.select(self.layers, kinds=("cross", "joint"))
        subjects = [r for r in self.regions if r.image is not None]
        if subjects:
            found = session.adapter.image_prompt_adapters(session.denoisers[0])
            check(
                found == 1,
                "regions",
                [r.image for r in subjects],
                f"subject images with exactly one IP-Adapter loaded in the pipeline (found {found}; "
                "load one with pipe.load_ip_adapter)",
            )
        inputs = _RegionInputs(self)
        session.add_wrapper(inputs)
        edit = _LayoutEdit(self, inputs, {layer.name for layer in acting})
        # Region prompts' tokens are in every text-attending layer's keys: the layers the layout
        # does not act on get the edit too, to keep them unseen there.
        text_layers = [layer for layer in session.layers if layer.kind in ("cross", "joint")]
        session.add_edit(text_layers if inputs.appends else acting, edit)


class _RegionInputs(DenoiserWrapper):
    """Appends the region prompts' tokens to the denoiser's text and gives the IP-Adapter the
    subject images; remembers where the prompt's own tokens end."""

    def __init__(self, spec: Layout):
        self.prompts = [r for r in spec.regions if r.prompt is not None]
        self.subjects = [r for r in spec.regions if r.image is not None]
        self.appends = bool(self.prompts) and spec.sub_prompts  # region prompt tokens in the text
        self.region_tokens = spec.region_tokens
        self.tokens = PerGeneration(self._encode_prompts)
        self.images = PerGeneration(self._encode_images)
        self.base_len = 0  # text tokens of the prompt itself in the current call
        self.lengths = [0] * len(self.prompts)  # text tokens of each region prompt in the call
        self._generation = -1  # the generation whose calls these are

    def before(self, session: Any, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        adapter = session.adapter
        first = self._generation != session.generation  # the first denoiser call of a generation
        self._generation = session.generation
        if self.subjects:
            if first:
                added = kwargs.get("added_cond_kwargs") or {}
                check(
                    "image_embeds" not in added,
                    "ip_adapter_image",
                    "given",
                    "None with Layout subjects: their images come from the regions' `image` paths",
                )
            negative, positive = self.images.get(session)
            embeds = torch.stack(
                [negative if r in session.rows.uncond else positive for r in range(session.batch)]
            )
            kwargs = adapter.with_image_embeds(kwargs, embeds)
        text = kwargs.get("encoder_hidden_states")
        if not self.appends:
            self.base_len = 0 if text is None else text.shape[1]
            return args, kwargs
        tokens = self.tokens.get(session)
        if first or text is None or text.shape[1] != self.base_len + tokens.shape[1]:
            # not yet extended (a nested forward of another control may see extended inputs)
            self.base_len = 0 if text is None else text.shape[1]
            kwargs = adapter.append_text(kwargs, tokens.expand(session.batch, -1, -1))
        return args, kwargs

    def _encode_prompts(self, session: Any) -> torch.Tensor:
        """[1, R, C]: the region prompts' conditional embeddings, concatenated along the sequence."""
        pipe = session.pipe
        # The class's method: the session wraps the instance's to notice new generations.
        encode = type(pipe).encode_prompt
        embeds = []
        for region in self.prompts:
            kwargs = _encode_kwargs(encode, region.prompt, pipe._execution_device)
            with torch.no_grad():
                embed = encode(pipe, **kwargs)[0]
            if self.region_tokens != "all":
                words, ends = session.adapter.prompt_span(pipe, region.prompt)
                embed = embed[:, sorted({*words, *ends} if self.region_tokens == "span" else words)]
            embeds.append(embed)
        self.lengths = [e.shape[1] for e in embeds]
        return torch.cat(embeds, dim=1)

    def _encode_images(self, session: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The subject images' (negative, positive) IP-Adapter embeddings, [n, D] each."""
        from PIL import Image

        images = [Image.open(r.image).convert("RGB") for r in self.subjects]
        with torch.no_grad():
            (embeds,) = session.pipe.prepare_ip_adapter_image_embeds(
                [images], None, session.pipe._execution_device, 1, True
            )
        return embeds[0], embeds[1]


def _encode_kwargs(encode: Any, prompt: str, device: torch.device) -> dict[str, Any]:
    """Arguments for a pipeline's `encode_prompt` that encode one prompt, conditional only."""
    known = {
        "prompt": prompt,
        "device": device,
        "num_images_per_prompt": 1,
        "do_classifier_free_guidance": False,
    }
    kwargs = {}
    for name, arg in list(inspect.signature(encode).parameters.items())[1:]:
        if name in known:
            kwargs[name] = known[name]
        elif arg.default is inspect.Parameter.empty and arg.kind is arg.POSITIONAL_OR_KEYWORD:
            kwargs[name] = None  # e.g. SD3's prompt_2 / prompt_3: None means "the same prompt"
    return kwargs


class _LayoutEdit(AttentionEdit):
    def __init__(self, spec: Layout, inputs: _RegionInputs, acting: set[str]):
        self.spec, self.inputs, self.acting = spec, inputs, acting
        self.prompts, self.subjects = inputs.prompts, inputs.subjects
        self.words = PerGeneration(self._own_words)
        self._plans: dict[tuple, Plan] = {}
        self._generation = -1

    # ---- when ----------------------------------------------------------------------------
    def active(self, session: Any, layer: LayerInfo) -> bool:
        # appended region tokens must stay unseen wherever the layout does not act
        return (
            self.inputs.appends
            or (bool(self.prompts) and self._acts(session, layer, prompts=True))
            or (bool(self.subjects) and self._acts(session, layer))
        )

    def _acts(self, session: Any, layer: LayerInfo, prompts: bool = False) -> bool:
        """Whether the layout acts in this call: for its subjects at each of its steps; with
        `prompts`, for its region prompts, at the first `prompt_fraction` of those steps."""
        if layer.name not in self.acting or not in_steps(
            session.step, session.num_steps, steps=self.spec.steps
        ):
            return False
        if not prompts:
            return True
        chosen = range(session.num_steps) if self.spec.steps is None else sorted(set(self.spec.steps))
        return chosen.index(session.step) < self.spec.prompt_fraction * len(chosen)

    # ---- region prompts: who sees which keys ------------------------------------------------
    def key_bias(self, call: AttentionCall, rows: list[int], queries: slice) -> torch.Tensor | None:
        if not self.prompts:
            return None
        plans = self._row_plans(call)
        dtype, device = call.query.dtype, call.query.device
        biases = {id(p): p.bias(queries, torch.float32, device) for p in set(plans.values())}
        return torch.stack([biases[id(plans[r])] for r in rows])[:, None].to(dtype)

    def kernel(self, call: AttentionCall) -> torch.Tensor | None:
        if not self.prompts:
            return None  # subjects only: the model's kernel for the text, streams in mix_output
        plans = self._row_plans(call)
        q, k, v = call.query, call.key, call.value
        out = v.new_empty(*q.shape[:3], v.shape[-1])
        for plan in set(plans.values()):
            rows = torch.tensor([r for r, p in plans.items() if p is plan], device=q.device)
            mask = self._key_mask(call, rows)
            part = grouped_attention(q[rows], k[rows], v[rows], plan, self._kernel(call), mask)
            out.index_copy_(0, rows, part)
        return out

    def mix_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if self.prompts and self._acts(call.session, call.layer, prompts=True):
            out = self._mix_prompts(call, out)
        if self.subjects and self._acts(call.session, call.layer):
            out = self._mix_subjects(call, out)
        return out

    # ---- helpers ---------------------------------------------------------------------------
    def _kernel(self, call: AttentionCall):
        return lambda q, k, v, mask=None: call.default_kernel(q, k, v, mask, call.kernel_scale)

    def _key_mask(self, call: AttentionCall, rows: torch.Tensor) -> torch.Tensor | None:
        """The call's own mask of the given rows where it masks keys alike for every query (e.g.
        Sana's text padding): the grouped kernels honour it on the keys they gather."""
        mask = call.mask
        if mask is None:
            return None
        if mask.shape[-2] != 1:
            raise ValueError(
                f"Layout region prompts cannot be combined with the per-query attention mask of {call.layer.name}"
            )
        return mask if mask.shape[0] == 1 else mask[rows.to(mask.device)]

    def _text_layout(self, call: AttentionCall) -> TextLayout:
        lay = call.layout
        base, lengths = self.inputs.base_len, self.inputs.lengths
        text = lay.text_k
        if text is None or text.stop - text.start != base + sum(lengths):
            raise ValueError(
                f"{call.layer.name}: the text keys do not hold the prompt's {base} and the regions' "
                f"{sum(lengths)} tokens (the denoiser was called without the layout's inputs?)"
            )
        starts = [text.start + base + sum(lengths[:j]) for j in range(len(lengths))]
        return TextLayout(
            queries=call.query.shape[2],
            keys=call.key.shape[2],
            image_q=lay.image_q,
            image_k=lay.image_k,
            base=slice(text.start, text.start + base),
            regions=[slice(s, s + n) for s, n in zip(starts, lengths, strict=True)],
        )

    def _row_plans(self, call: AttentionCall) -> dict[int, Plan]:
        """The plan of each batch row: regional for the conditional (and perturbed) rows where the
        layout acts, else the plain one."""
        session = call.session
        if self._generation != session.generation:
            self._plans.clear()
            self._generation = session.generation
        lay = self._text_layout(call)
        grid = (call.layout.height, call.layout.width)
        key = (grid, lay.queries, lay.keys, lay.image_q.start, lay.base.start, lay.base.stop)
        plain = self._cached((*key, "plain"), lambda: plain_plan(lay))
        plans = {r: plain for r in range(call.query.shape[0])}
        if not self._acts(session, call.layer, prompts=True):
            return plans
        guided = list(call.rows.cond) + list(call.rows.perturbed)
        own = self._words_for_rows(session, call.rows) if self.spec.mode == "crop_merge" else {}
        for r in guided:
            words = own.get(r)
            plans[r] = self._cached(
                (*key, "regional", None if words is None else tuple(map(tuple, words))),
                lambda words=words: self._regional(lay, grid, words),
            )
        return plans

    def _regional(self, lay: TextLayout, grid: tuple[int, int], words: list[list[int]] | None) -> Plan:
        boxes = [r.box for r in self.prompts]
        owner = owners(boxes, [r.priority for r in self.prompts], *grid)
        crop = self.spec.mode == "crop_merge"
        cells = [owner == j if crop else box_cells(b, *grid) for j, b in enumerate(boxes)]
        return regional_plan(lay, owner, cells, words, self.spec.hides_words, crop)

    def _cached(self, key: tuple, build: Any) -> Plan:
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]

    def _words_for_rows(self, session: Any, rows: Any) -> dict[int, list[list[int]]]:
        """Per guided row, each region's own words' positions in that row's prompt (perturbed rows
        are copies of the conditional ones, in their order). Without the prompt's text (a call with
        prompt_embeds) none: boxes then see their region's tokens only; hiding words needs the text
        (`session.prompts` says so)."""
        if session.prompt is None and not self.spec.hides_words:
            return {}
        per_prompt = self.words.get(session)
        prompts = session.prompts()
        out = {}
        for guided in (rows.cond, rows.perturbed):
            out.update({r: per_prompt[prompts[i % len(prompts)]] for i, r in enumerate(guided)})
        return out

    def _own_words(self, session: Any) -> dict[str, list[list[int]]]:
        """Per distinct prompt: per region, the text positions of its own words (those of its
        prompt that no other region's prompt has) in the prompt."""
        words = [set(re.findall(r"[\w'-]+", r.prompt.lower())) for r in self.prompts]
        own = [w - set().union(*(o for j, o in enumerate(words) if j != i)) for i, w in enumerate(words)]
        out = {}
        for prompt in dict.fromkeys(session.prompts()):
            out[prompt] = [
                sorted({p for w in mine for p in _all_positions(session, prompt, w)}) for mine in own
            ]
        return out

    def _mix_prompts(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """base_prompt_weight and scale (crop_merge: lerp from the plain attention), or the region
        streams under their masks (mask_and_sum)."""
        w = self.spec.base_prompt_weight
        crop = self.spec.mode == "crop_merge"
        words_hidden = self.spec.hides_words
        plain_everywhere = w == 0 and all(r.scale == 1 for r in self.prompts)
        rows = list(call.rows.cond) + list(call.rows.perturbed)
        if not rows or (crop and plain_everywhere):
            return out  # the regional output as the kernel gave it
        lay = self._text_layout(call)
        grid = (call.layout.height, call.layout.width)
        image = torch.arange(lay.image_q.start, lay.image_q.stop)
        idx = torch.tensor(rows, device=out.device)
        q, k, v = (x.index_select(0, idx) for x in (call.query, call.key, call.value))
        kernel = self._kernel(call)
        mask = self._key_mask(call, idx)
        part = out.index_select(0, idx)
        if crop:
            owner = owners([r.box for r in self.prompts], [r.priority for r in self.prompts], *grid)
            keys = torch.cat(
                [
                    torch.arange(lay.image_k.start, lay.image_k.stop),
                    lay.other_keys,
                    torch.arange(lay.base.start, lay.base.stop),
                ]
            )
            keys = keys.to(out.device)
            for o in sorted(set(owner.tolist())):
                factor = (1 - w) * (self.prompts[o].scale if o >= 0 else 1.0)
                if factor == 1 or (o < 0 and not words_hidden):
                    continue  # the regional output as it is (outside every box it is the plain one)
                queries = image[owner == o].to(out.device)
                plain = kernel(
                    take(q, queries),
                    take(k, keys),
                    take(v, keys),
                    None if mask is None else key_columns(mask, keys),
                )
                put(part, queries, torch.lerp(plain, take(part, queries), factor))
        else:
            for j, region in enumerate(self.prompts):
                factor = (1 - w) * region.scale
                if factor == 0:
                    continue
                queries = image[box_cells(region.box, *grid)].to(out.device)
                region_mask = None if mask is None else mask[..., lay.regions[j]]
                z = kernel(take(q, queries), k[:, :, lay.regions[j]], v[:, :, lay.regions[j]], region_mask)
                put(part, queries, take(part, queries) + factor * z)
        return out.index_copy(0, idx, part)

    def _mix_subjects(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """The IP-Adapter stream, by box: crop-and-merge, or diffusers' own masked sum."""
        streams = call.image_streams
        if len(streams) != 1 or streams[0].images != len(self.subjects):
            raise ValueError(
                f"{call.layer.name}: Layout subjects need one IP-Adapter stream with {len(self.subjects)} "
                f"images; this call has {len(streams)} stream(s)"
            )
        stream = streams[0]
        adapter_scale = (
            stream.scale if isinstance(stream.scale, list) else [stream.scale] * len(self.subjects)
        )
        scales = [a * r.scale for a, r in zip(adapter_scale, self.subjects, strict=True)]
        boxes = [r.box for r in self.subjects]
        if self.spec.mode == "mask_and_sum":
            _, h, w = call.session.grid
            factor = getattr(call.session.pipe, "vae_scale_factor", 8)
            stream.mask = pixel_masks(boxes, h * factor, w * factor).to(out.device)
            stream.scale = scales
            return out  # the family adds it as diffusers does, with these masks
        streams.remove(stream)  # added here instead, box by box
        lay = call.layout
        owner = owners(boxes, [r.priority for r in self.subjects], lay.height, lay.width)
        image = torch.arange(lay.image_q.start, lay.image_q.stop)
        out = out.clone()
        for j in sorted(o for o in set(owner.tolist()) if o >= 0):
            if scales[j] == 0:
                continue
            queries = image[owner == j].to(out.device)
            key, value = stream.keys_values(call.query.shape[1], image=j)
            z = self._kernel(call)(take(call.query, queries), key, value)
            put(out, queries, take(out, queries) + scales[j] * z.to(out.dtype))
        return out


def _all_positions(session: Any, prompt: str, word: str) -> list[int]:
    """Text positions of every occurrence of `word` in `prompt` (none if it is not there)."""
    found, occurrence = [], 0
    while True:
        try:
            found += session.adapter.text_positions(session.pipe, prompt, word, occurrence)
        except TokenNotFoundError:
            return found
        occurrence += 1


def render_layout(path: str | Path, image: Any, layout: Layout, size: int = 256) -> Path:
    """Save `layout_image(image, layout)` as a PNG."""
    from .maps import save_image

    return save_image(layout_image(image, layout, size), path)


def draw_boxes(image: Any, regions: list[Region]) -> Any:
    """A copy of a PIL image with each region's box drawn and labelled (its prompt, else its image's
    file name), one colour per region."""
    from PIL import ImageDraw

    boxed = image.copy()
    draw = ImageDraw.Draw(boxed)
    width, height = boxed.size
    colours = ("red", "blue", "green", "orange", "purple", "black")
    for i, region in enumerate(regions):
        x0, y0, x1, y1 = region.box
        xy = (x0 * width, y0 * height, x1 * width - 1, y1 * height - 1)
        colour = colours[i % len(colours)]
        draw.rectangle(xy, outline=colour, width=2)
        label = region.prompt if region.prompt is not None else Path(region.image).name
        draw.text((xy[0] + 3, xy[1] + 2), label, fill=colour)
    return boxed


def layout_image(image: Any, layout: Layout, size: int = 256) -> Any:
    """The image and, beside it, the image with the layout's boxes drawn and labelled (PIL)."""
    from PIL import Image

    from .maps import to_pil

    base = to_pil(image).convert("RGB")
    height = max(1, round(size * base.size[1] / base.size[0]))
    base = base.resize((size, height))
    boxed = draw_boxes(base, layout.regions)
    sheet = Image.new("RGB", (2 * size, height), "white")
    sheet.paste(base, (0, 0))
    sheet.paste(boxed, (size, 0))
    return sheet
