"""The web demo: one Gradio `Blocks` app for every control, built from the controls' field metadata.

Every panel is generated from a control's `fields()` (kind, range, help), so a new control appears
without UI code. The Generate button turns the panels into the controls JSON (the same list of
`to_dict()`s a saved config or the API takes) and the `generate` endpoint runs from that JSON alone:
the UI, `gradio_client` and pasted configs share one validated path, `attnctl.generate`.
"""

import dataclasses
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.controls import _REGISTRY, INT_MAX, Control, FieldSpec, shown
from ..families.support import METHODS
from ..pipelines.generate import generate
from ..processors.layout import Region, draw_boxes

TITLE = "attnctl — attention control for diffusers"
# small images (the testbed draws 32 px) are shown enlarged, pixel for pixel; pass to launch(css=CSS)
CSS = """
#controlled img, #baseline img, #layout img, #video img {
  image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;
}
"""
REGION_COLUMNS = ["x0", "y0", "x1", "y1", "prompt", "image", "priority", "scale"]
NUMBER_RULE_KINDS = ("number", "integer")


# ---- fields <-> widget values (plain functions: the app and its tests share them) ----------------
def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A control's field value as its widget shows it."""
    if spec.kind in ("layers", "steps"):
        return "" if value is None else ", ".join(str(v) for v in value)
    if spec.kind == "data":
        return json.dumps(value)
    if spec.kind == "regions":
        rows = []
        for r in value or []:
            r = r.to_dict() if hasattr(r, "to_dict") else r
            x0, y0, x1, y1 = r["box"]
            rows.append(
                [
                    x0,
                    y0,
                    x1,
                    y1,
                    r.get("prompt") or "",
                    r.get("image") or "",
                    r.get("priority", 0),
                    r.get("scale", 1.0),
                ]
            )
        return rows
    if spec.kind == "words":
        return list(value or [])
    return value


def from_widget(spec: FieldSpec, value: Any) -> Any:
    """A widget's value as the control's field value (validation is the control's)."""
    if spec.kind in ("layers", "steps"):
        text = "" if value is None else str(value).strip()
        if not text:
            return None if spec.optional else []
        items = [v.strip() for v in text.split(",")]
        return [int(v) if re.fullmatch(r"-?\d+", v) else v for v in items]
    if spec.kind == "data":
        text = "" if value is None else str(value).strip()
        if not text:
            return spec.default
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec.name}={shown(text)} is not allowed: JSON ({e.msg})") from None
        except (RecursionError, ValueError):  # nested too deeply, a number of too many digits
            raise ValueError(f"{spec.name}={shown(text)} is not allowed: JSON this server reads") from None
    if spec.kind == "regions":
        return [_region(row) for row in _filled_rows(value)]
    if spec.kind == "words":
        words = [w for w in (value or []) if str(w).strip()]
        return None if not words and spec.optional else words
    if spec.kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if spec.kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _filled_rows(value: Any) -> list[list[Any]]:
    """The table's rows that hold anything (a table keeps empty rows the user has not filled)."""
    return [row for row in _rows(value) if any(str(c).strip() for c in row if c is not None)]


def _rows(value: Any) -> list[list[Any]]:
    if value is None:
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):  # a pandas DataFrame
        return value.values.tolist()
    if isinstance(value, dict):  # gradio's {"headers": ..., "data": ...}
        return list(value.get("data") or [])
    return [list(r) for r in value]


def _region(row: list[Any]) -> dict[str, Any]:
    cells = dict(zip(REGION_COLUMNS, list(row) + [None] * (len(REGION_COLUMNS) - len(row)), strict=False))
    try:
        box = [float(cells[k]) for k in ("x0", "y0", "x1", "y1")]
    except (TypeError, ValueError):
        raise ValueError(
            f"box={[cells[k] for k in ('x0', 'y0', 'x1', 'y1')]!r} is not allowed: four numbers x0, y0, x1, y1 in [0, 1]"
        ) from None
    region: dict[str, Any] = {"box": box}
    for key in ("prompt", "image"):
        text = "" if cells[key] is None else str(cells[key]).strip()
        region[key] = text or None
    for key, cast, default in (("priority", int, 0), ("scale", float, 1.0)):
        cell = cells[key]
        try:
            region[key] = default if cell in (None, "") else cast(float(cell)) if cast is int else cast(cell)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{key}={cell!r} is not allowed: a finite number") from None
    return region


def loss_table(log: dict[str, list[dict]]) -> Any:
    """The controls' logged losses as a table (control, step, loss: the mean over the step's
    entries; Attention Regulation's best loss); None when nothing logged a loss."""
    import pandas as pd

    sums: dict[tuple[str, int], list[float]] = {}
    for kind, entries in log.items():
        for e in entries:
            value = e.get("loss", e.get("best_loss"))
            if value is not None and "step" in e:
                sums.setdefault((kind, int(e["step"])), []).append(float(value))
    if not sums:
        return None
    rows = [(kind, step, sum(v) / len(v)) for (kind, step), v in sorted(sums.items())]
    return pd.DataFrame(rows, columns=["control", "step", "loss"])


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt, in order, once each (what the word pickers offer)."""
    return list(dict.fromkeys(re.findall(r"[\w'-]+", prompt or "")))


# the panels' order: the support matrix's; a control not named there (e.g. a new one) comes after them
PANEL_ORDER = METHODS


def panel_controls() -> list[type[Control]]:
    """Every registered control class, in the app's order."""
    rank = {name: i for i, name in enumerate(PANEL_ORDER)}
    return sorted(_REGISTRY.values(), key=lambda cls: rank.get(cls.kind, len(rank)))


# ---- the app ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Panel:
    """One control's panel: its enable box and one widget per field."""

    cls: type[Control]
    enable: Any
    widgets: dict[str, Any]

    def specs(self) -> list[FieldSpec]:
        return self.cls.fields()


def _widget(spec: FieldSpec, gr: Any, value: Any) -> Any:
    label, info, value = spec.name, spec.help, to_widget(spec, value)
    if spec.kind in NUMBER_RULE_KINDS:
        integer = spec.kind == "integer"
        if spec.low is not None and spec.high is not None and not spec.optional:
            step = 1 if integer else (spec.high - spec.low) / 100
            return gr.Slider(spec.low, spec.high, value=value, step=step, label=label, info=info)
        return gr.Number(
            value=value,
            precision=0 if integer else None,
            minimum=spec.low,
            maximum=spec.high,
            label=label,
            info=info,
        )
    if spec.kind == "bool":
        return gr.Checkbox(value=value, label=label, info=info)
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices or ()), value=value, label=label, info=info)
    if spec.kind == "words":
        return gr.Dropdown([], value=value, multiselect=True, allow_custom_value=True, label=label, info=info)
    if spec.kind == "regions":
        return gr.Dataframe(
            value=value or None,
            headers=REGION_COLUMNS,
            datatype=["number", "number", "number", "number", "str", "str", "number", "number"],
            type="array",
            label=label + " (type boxes, or click two corners on the canvas)",
            interactive=True,
        )
    placeholder = "None" if spec.optional else ""
    return gr.Textbox(value=value, label=label, info=info, placeholder=placeholder)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (`attnctl ui --max-pixels ...`): the image's pixels
    (height x width), denoising steps, video frames, a control's iterations per step (Attention
    Regulation's, A-STAR's and Attend-and-Excite's refinement) and seconds of generation."""

    max_pixels: int = 1024 * 1024
    max_steps: int = 100
    max_frames: int = 129
    max_iterations: int = 50
    max_seconds: float = 600.0

    def check(self, kwargs: dict[str, Any], controls: list[dict]) -> None:
        """One ValueError naming the request's value and the server's limit, before any work."""
        height, width = kwargs.get("height"), kwargs.get("width")
        if height is not None and width is not None and height * width > self.max_pixels:
            raise ValueError(
                f"height x width = {height} x {width} is more than this server's {self.max_pixels} pixels"
            )
        for name, limit in (("steps", self.max_steps), ("num_frames", self.max_frames)):
            if kwargs.get(name) is not None and kwargs[name] > limit:
                raise ValueError(f"{name}={kwargs[name]} is more than this server's {limit}")
        kinds = [c.get("kind") for c in controls if isinstance(c, dict)]
        repeated = sorted({k for k in kinds if isinstance(k, str) and kinds.count(k) > 1})
        if repeated:
            raise ValueError(
                f"controls: {', '.join(repeated)} more than once; the web demo takes one control of each kind"
            )
        for c in (c for c in controls if isinstance(c, dict)):
            for name in ("iterations", "max_refinement"):
                value = c.get(name)
                if isinstance(value, int) and value > self.max_iterations:
                    raise ValueError(
                        f"{c.get('kind')}.{name}={value} is more than this server's {self.max_iterations}"
                    )
            # the server's files are not the request's to name: head-search results and subject images
            if isinstance(c.get("heads"), str):
                raise ValueError(f"{c.get('kind')}.heads: the web demo takes heads, not a path on the server")
            for region in c.get("regions") or ():
                if isinstance(region, dict) and region.get("image") is not None:
                    raise ValueError(
                        "Layout regions: the web demo takes no subject image paths on the server"
                    )


def build_app(
    pipe: Any,
    *,
    model: str | None = None,
    call_kwargs: dict[str, Any] | None = None,
    steps: int = 25,
    prompt: str = "a red circle and a blue square",
    controls: list[Control] | None = None,
    limits: Limits = Limits(),
) -> Any:
    """The Gradio app for `pipe`. `call_kwargs` go to every pipeline call (e.g. a tiny model's
    size); `steps`, `prompt` and `controls` (e.g. a saved config) are the values the page opens with;
    `limits` bound what one request may ask."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from ..families import adapter_for

    call_kwargs = dict(call_kwargs or {})
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    adapter = adapter_for(denoiser)
    family, video = adapter.name, adapter.video
    height, width = _default_size(pipe, call_kwargs)
    default_height, default_width = height, width
    opening = {c.kind: c for c in controls or []}
    lock = threading.Lock()  # one generation at a time on the pipeline, whatever the queue does

    def run(prompt, controls, seed, steps, height=None, width=None, baseline=True, progress=gr.Progress()):
        gone = _client_gone()
        try:
            # checked before any work and before waiting for the pipeline: a bad or oversized
            # request is answered at once, whatever runs
            dicts = Control.dicts_from_json(controls or "")
            kwargs = {**call_kwargs}
            for name, value in (("height", height), ("width", width)):
                if value not in (None, ""):
                    kwargs[name] = _int(name, value)
            if ("height" in kwargs) != ("width" in kwargs):  # one side given: the other the page's
                kwargs.setdefault("height", default_height)
                kwargs.setdefault("width", default_width)
            kwargs.update(seed=_int("seed", seed, low=0), steps=_int("steps", steps, low=1))
            limits.check({"height": height, "width": width, **call_kwargs, **kwargs}, dicts)
            controls = Control.from_dicts(dicts)
            deadline = time.monotonic() + limits.max_seconds

            def step(desc: str) -> Callable[[int, int], None]:
                def on_step(i: int, n: int) -> None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the request ran past this server's {limits.max_seconds:g} s")
                    why = gone()
                    if why:  # nobody waits for the images: stop here (attnctl restores the pipeline)
                        raise RequestCancelled(f"client {why} at step {i} of {n} ({desc} image)")
                    progress((i, n), desc=desc)

                return on_step

            with lock:
                result = generate(pipe, prompt, controls, on_step=step("controlled"), **kwargs)
                plain = generate(pipe, prompt, [], on_step=step("baseline"), **kwargs) if baseline else None
        except RequestCancelled as e:
            _log_cancelled(str(e))
            raise gr.Error(f"request cancelled: {e}", print_exception=False) from None
        except (ValueError, TimeoutError) as e:  # bad input (the controls' own messages), time limit
            _log_rejected(str(e))
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the user sees why
            _log_rejected(f"generation failed: {type(e).__name__}: {e}")
            raise gr.Error(f"generation failed: {type(e).__name__}: {e}", print_exception=False) from None
        words = None
        for c in controls:
            if c.kind == "AttentionMaps" and c.tokens:
                words = list(c.tokens)
        saved = _save_json([c.to_dict() for c in controls])
        return (
            result.image,
            None if plain is None else plain.image,
            result.heatmaps(words),
            result.layout_image(),
            _gif(result.images) if result.video else None,
            result.log,
            loss_table(result.log),
            saved,
        )

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {TITLE}\nModel: `{model or 'the bundled testbed model'}` ({family}). "
            "Enable controls below; the controlled image and the baseline use the same seed."
        )
        with gr.Row():
            with gr.Column(scale=2):
                prompt_box = gr.Textbox(value=prompt, label="prompt", elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed")  # checked in run(), by name
                    steps_box = gr.Number(
                        value=steps, precision=0, label=f"steps (at most {limits.max_steps})"
                    )
                    height_box = gr.Number(value=height, precision=0, minimum=8, label="height")
                    width_box = gr.Number(value=width, precision=0, minimum=8, label="width")
                    baseline = gr.Checkbox(value=True, label="baseline too")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                panels = []
                for cls in panel_controls():
                    visible = video or not cls.video_only
                    with gr.Accordion(cls.kind, open=False, visible=visible):
                        gr.Markdown((cls.__doc__ or "").strip().split("\n\n")[0])
                        given = opening.get(cls.kind)
                        enable = gr.Checkbox(value=given is not None, label=f"use {cls.kind}")
                        widgets = {}
                        for spec in cls.fields():
                            value = spec.default if given is None else getattr(given, spec.name)
                            widgets[spec.name] = _widget(spec, gr, value)
                            if spec.kind == "regions":
                                _canvas(gr, widgets[spec.name], width, height)
                        panels.append(Panel(cls, enable, widgets))
                with gr.Accordion("controls JSON", open=False):
                    controls_json = gr.Code(
                        value=json.dumps([c.to_dict() for c in controls or []], indent=1),
                        language="json",
                        label="controls (a list of to_dict()s)",
                        elem_id="controls-json",
                    )
                    load = gr.Button("Load JSON into the panels")
            with gr.Column(scale=3):
                with gr.Row():
                    image = gr.Image(
                        label="controlled", type="pil", format="png", height=288, elem_id="controlled"
                    )
                    base_image = gr.Image(
                        label="baseline (same seed)", type="pil", format="png", height=288, elem_id="baseline"
                    )
                maps_image = gr.Image(
                    label="attention maps of the chosen words", type="pil", format="png", elem_id="maps"
                )
                layout_image = gr.Image(
                    label="layout: the boxes over the image", type="pil", format="png", elem_id="layout"
                )
                video_out = gr.Image(
                    label="video (animated GIF)", type="filepath", height=288, visible=video, elem_id="video"
                )
                losses = gr.LinePlot(
                    x="step",
                    y="loss",
                    color="control",
                    label="losses per step (mean over images, layers and updates)",
                )
                log = gr.JSON(label="log: what each control did per step")
                download = gr.File(label="controls JSON")

        word_boxes = [w for p in panels for s in p.specs() if s.kind == "words" for w in [p.widgets[s.name]]]
        flat = [c for p in panels for c in [p.enable, *p.widgets.values()]]

        def to_json(*values):
            return json.dumps(_controls_from_widgets(panels, list(values)), indent=1)

        def from_json(text):
            return _widgets_from_controls(panels, text)

        def offer_words(text):
            words = prompt_words(text)
            return [gr.update(choices=words) for _ in word_boxes]

        if word_boxes:
            prompt_box.change(offer_words, prompt_box, word_boxes, api_name=False)
            app.load(offer_words, prompt_box, word_boxes, api_name=False)
        button.click(_showing_errors(to_json, gr), flat, controls_json, api_name=False).success(
            run,
            [prompt_box, controls_json, seed, steps_box, height_box, width_box, baseline],
            [image, base_image, maps_image, layout_image, video_out, log, losses, download],
            api_name="generate",
            concurrency_limit=1,
        )
        load.click(_showing_errors(from_json, gr), controls_json, flat, api_name=False)
    app.attnctl_panels = panels
    # Requests are taken as they come (a bad one answered at once); generations run one at a time
    # on the pipeline (the lock in `run`); a generation whose client has gone away (closed the page
    # or the event stream, or cancelled the job) stops at its next denoising step.
    return app.queue(default_concurrency_limit=None)


def _showing_errors(fn: Any, gr: Any) -> Any:
    """`fn` with its ValueErrors shown as the app's error message."""

    def call(*args):
        try:
            return fn(*args)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    return call


def _controls_from_widgets(panels: list[Panel], values: list[Any]) -> list[dict]:
    """The enabled panels as validated control dicts (each built, so a bad value names its field)."""
    out, i = [], 0
    for panel in panels:
        enabled, fields = values[i], values[i + 1 : i + 1 + len(panel.widgets)]
        i += 1 + len(panel.widgets)
        if not enabled:
            continue
        data = {"kind": panel.cls.kind}
        for spec, value in zip(panel.specs(), fields, strict=True):
            data[spec.name] = from_widget(spec, value)
        try:
            out.append(Control.from_dict(data).to_dict())
        except ValueError as e:
            raise ValueError(f"{panel.cls.kind}: {e}") from None
    return out


def _widgets_from_controls(panels: list[Panel], text: str) -> list[Any]:
    """Widget values (enable box, then fields, per panel) from controls JSON."""
    controls = {c.kind: c for c in Control.list_from_json(text or "")}
    values: list[Any] = []
    for panel in panels:
        c = controls.get(panel.cls.kind)
        values.append(c is not None)
        for spec in panel.specs():
            values.append(to_widget(spec, getattr(c, spec.name) if c is not None else spec.default))
    return values


def _canvas(gr: Any, table: Any, width: int, height: int) -> Any:
    """A blank canvas at the image's aspect ratio: two clicks add a box to `table`; the boxes are
    drawn on it whenever the table changes."""
    from PIL import Image

    size = (512, max(1, round(512 * height / width)))
    corner = gr.State(None)
    blank = Image.new("RGB", size, (245, 245, 245))
    with gr.Row():
        box_prompt = gr.Textbox(label="prompt of the next drawn box", scale=3)
        clear = gr.Button("clear boxes", scale=1)
    canvas = gr.Image(
        value=blank,
        type="pil",
        label="canvas: click two corners to add a box",
        interactive=False,
        show_label=True,
    )

    def click(rows, first, text, evt: gr.SelectData):
        x, y = evt.index[0] / size[0], evt.index[1] / size[1]
        if first is None:
            return rows, (x, y)
        ax, ay = first
        box = [round(v, 3) for v in (min(ax, x), min(ay, y), max(ax, x), max(ay, y))]
        return _filled_rows(rows) + [[*box, text or "", "", 0, 1.0]], None

    def redraw(rows):
        regions = []
        for row in _filled_rows(rows):
            try:
                regions.append(Region(**_region(row)))
            except ValueError:
                pass  # a row still being typed: drawn once it is a valid box
        return draw_boxes(blank, regions)

    canvas.select(click, [table, corner, box_prompt], [table, corner], api_name=False)
    table.change(redraw, table, canvas, api_name=False)
    clear.click(lambda: (None, None), None, [table, corner], api_name=False)
    return canvas


def _default_size(pipe: Any, call_kwargs: dict) -> tuple[int, int]:
    if "height" in call_kwargs and "width" in call_kwargs:
        return int(call_kwargs.pop("height")), int(call_kwargs.pop("width"))
    scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8)
    unet = getattr(pipe, "unet", None)
    sample = unet.config.sample_size if unet is not None else getattr(pipe, "default_sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    side = int(sample * scale)
    return side, side


class RequestCancelled(Exception):
    """Raised at a denoising step of a request whose client has gone away."""


def _client_gone() -> Callable[[], str | None]:
    """For the queued request running in this thread: a check whether its client has gone away.
    It answers "disconnected" once the client's event stream has closed (Gradio's queue then marks
    the event not alive) and "cancelled the request" once the client cancelled the job (`/cancel`,
    e.g. gradio_client's `job.cancel()`: the queue drops the event, while this thread runs on, as
    Gradio cannot stop a function running in a worker thread); otherwise None. It reads the state
    of Gradio's queue (gradio 6; tests/test_ui.py checks both ways of going away); outside a queued
    event, or with a Gradio whose queue keeps that state elsewhere, it always answers None."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
    if not isinstance(events, dict) or event_id not in events:
        return lambda: None

    def gone() -> str | None:
        event = events.get(event_id)
        if event is None:
            return "cancelled the request"
        return None if getattr(event, "alive", True) else "disconnected"

    return gone


def _log_cancelled(message: str) -> None:
    """One line in the server's log per generation stopped because its client went away."""
    print(f"attnctl ui: request cancelled: {message}", file=sys.stderr, flush=True)


def _log_rejected(message: str) -> None:
    """One line in the server's log per refused request (no traceback)."""
    print(f"attnctl ui: refused a request: {message}", file=sys.stderr, flush=True)


def _int(name: str, value: Any, low: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT_MAX
    if not ok or (low is not None and value < low):
        lo = -INT_MAX if low is None else low
        raise ValueError(f"{name}={shown(value)} is not allowed: an integer in [{lo}, {INT_MAX}]")
    return value


def _save_json(data: Any) -> str:
    path = Path(tempfile.mkdtemp(prefix="attnctl-")) / "controls.json"
    path.write_text(json.dumps(data, indent=1))
    return str(path)


def _gif(frames: list[Any]) -> str:
    path = Path(tempfile.mkdtemp(prefix="attnctl-")) / "video.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    return str(path)
