"""The web demo: panels generated from the controls' fields, and the `generate` API served on loopback."""

from __future__ import annotations

import concurrent.futures
import json
import re

import pytest

gr = pytest.importorskip("gradio", reason="the demo needs the ui extra: pip install -e '.[ui]'")

from test_fields import REQUIRED  # noqa: E402

import attnctl  # noqa: E402
from attnctl.core.controls import Control  # noqa: E402
from attnctl.tiny import tiny_pipeline  # noqa: E402
from attnctl.ui import TITLE, build_app  # noqa: E402
from attnctl.ui.app import from_widget, panel_controls, prompt_words, to_widget  # noqa: E402

SIZE = {"height": 32, "width": 32}


@pytest.fixture(scope="module")
def app():
    return build_app(tiny_pipeline("sd"), model="tiny:sd", call_kwargs=dict(SIZE), steps=2)


@pytest.fixture(scope="module")
def served(app):
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, share=False)
    from gradio_client import Client

    yield Client(app.local_url, verbose=False)
    app.close()


def _kind(component):
    return type(component).__name__


def test_every_control_has_a_panel_whose_widgets_match_its_fields(app):
    panels = {p.cls.kind: p for p in app.attnctl_panels}
    assert set(panels) == {cls.kind for cls in panel_controls()} >= set(REQUIRED)
    for kind, panel in panels.items():
        specs = panel.cls.fields()
        assert list(panel.widgets) == [s.name for s in specs]
        for spec in specs:
            w = panel.widgets[spec.name]
            assert w.label.startswith(spec.name) and (spec.kind == "regions" or w.info == spec.help)
            expected = {
                "bool": "Checkbox",
                "choice": "Dropdown",
                "words": "Dropdown",
                "regions": "Dataframe",
                "layers": "Textbox",
                "steps": "Textbox",
                "data": "Textbox",
            }.get(spec.kind)
            if spec.kind in ("number", "integer"):
                bounded = spec.low is not None and spec.high is not None and not spec.optional
                assert _kind(w) == ("Slider" if bounded else "Number"), (kind, spec.name)
                if bounded:
                    assert (w.minimum, w.maximum) == (spec.low, spec.high)
            else:
                assert _kind(w) == expected, (kind, spec.name)
            if spec.kind == "choice":
                assert [c[0] for c in w.choices] == list(spec.choices)
            if spec.kind == "words":
                assert w.multiselect


@pytest.mark.parametrize("kind", sorted(REQUIRED))
def test_widget_values_round_trip_every_control(kind):
    control = Control.from_dict({"kind": kind, **REQUIRED[kind]})
    for spec in control.fields():
        value = getattr(control, spec.name)
        again = from_widget(spec, to_widget(spec, value))
        if spec.kind == "regions":
            again = [attnctl.Region(**r) for r in again]
        assert Control.from_dict({**control.to_dict(), spec.name: again}) == control, spec.name


def test_loss_table_means_per_control_and_step():
    from attnctl.ui.app import loss_table

    log = {
        "AStar": [{"step": 0, "loss": 1.0}, {"step": 0, "loss": 3.0}, {"step": 1, "loss": 0.5}],
        "AttentionRegulation": [{"step": 0, "layer": "a", "best_loss": 0.25}],
    }
    assert loss_table(log).values.tolist() == [
        ["AStar", 0, 2.0],
        ["AStar", 1, 0.5],
        ["AttentionRegulation", 0, 0.25],
    ]
    assert loss_table({}) is None


def test_widget_parsing():
    maps = {s.name: s for s in attnctl.AttentionMaps.fields()}
    assert from_widget(maps["layers"], "up_blocks.1, 3") == ["up_blocks.1", 3]
    assert from_widget(maps["layers"], " ") is None
    assert from_widget(maps["steps"], "0,1, 2") == [0, 1, 2]
    assert from_widget(maps["tokens"], []) is None
    with pytest.raises(ValueError, match="^steps="):
        attnctl.AttentionMaps(steps=from_widget(maps["steps"], "0, x"))
    heads = {s.name: s for s in attnctl.SoftPAG.fields()}["heads"]
    with pytest.raises(ValueError, match=r"^heads=.*JSON"):
        from_widget(heads, "[1,")
    assert prompt_words("a red circle, a red square") == ["a", "red", "circle", "square"]


def _endpoint(app):
    """The `generate` endpoint's function, called as a request would call it."""
    return next(f.fn for f in app.fns.values() if f.api_name == "generate")


@pytest.mark.parametrize(
    "args, message",
    [  # found by the bad-input audit (benchmarks/audit.py)
        (
            ("a cat", "[]", 10**30, 1),
            "^seed=1000000000000000000000000000000 is not allowed",
        ),  # torch's Overflow
        (("a cat", "[]", 0, 1, 100_000, None), "more than this server's 4096 pixels"),  # one side: no limit
        (("a cat", json.dumps([{"kind": "AttentionMaps", "tokens": ["cat"]}] * 3), 0, 1), "more than once"),
    ],
)
def test_requests_refused_by_name(args, message, capfd):
    from attnctl.ui.app import Limits

    app = build_app(tiny_pipeline("sd"), call_kwargs=dict(SIZE), steps=2, limits=Limits(max_pixels=64 * 64))
    with pytest.raises(gr.Error) as err:
        _endpoint(app)(*args)
    assert re.search(message, err.value.message) and "\n" not in err.value.message


def test_a_side_given_alone_is_kept_and_the_other_is_the_pages():
    app = build_app(tiny_pipeline("sd"), call_kwargs=dict(SIZE), steps=2)
    image = _endpoint(app)("a cat", "[]", 0, 1, 64, None, False)[0]
    assert image.size == (32, 64)  # SD's pipeline alone would have made 32 x 32


def test_widget_values_that_cannot_be_read_name_the_field():
    specs = {s.name: s for s in attnctl.SoftPAG.fields()}
    with pytest.raises(ValueError, match="^heads=.* is not allowed: JSON"):
        from_widget(specs["heads"], "[" * 100_000)  # a RecursionError before
    layout = {s.name: s for s in attnctl.Layout.fields()}
    with pytest.raises(ValueError, match="^priority='inf' is not allowed: a finite number"):
        from_widget(layout["regions"], [[0, 0, 1, 1, "a cat", "", "inf", 1.0]])  # an OverflowError before


def test_page_has_the_title(app):
    assert app.title == TITLE


# ---- the API, served on loopback ----------------------------------------------------------------
def test_generate_with_maps(served):
    controls = json.dumps([attnctl.AttentionMaps(["cat", "frog"]).to_dict()])
    out = served.predict("a cat and a frog", controls, 0, 2, api_name="/generate")
    controlled, baseline, heatmaps, layout, video, log, losses, saved = out
    from PIL import Image

    assert Image.open(controlled).size == (32, 32) and Image.open(baseline).size == (32, 32)
    assert Image.open(heatmaps).size[0] > 2 * Image.open(heatmaps).size[1]  # the image and two maps
    assert layout is None and video is None
    assert json.load(open(saved)) == json.loads(controls)


def test_guidance_log_and_layout_come_back(served):
    controls = [
        attnctl.AStar(["cat", "frog"]).to_dict(),
        attnctl.Layout([attnctl.Region((0, 0, 0.5, 1), "a cat")]).to_dict(),
    ]
    out = served.predict("a cat and a frog", json.dumps(controls), 3, 2, 32, 32, False, api_name="/generate")
    assert out[1] is None  # no baseline asked for
    assert out[3] is not None and [e["step"] for e in out[5]["AStar"]] == [0]
    plotted = out[6]  # the loss plot's table: one row per control and step
    assert [(row[0], row[1]) for row in plotted["data"]] == [("AStar", 0)]


@pytest.mark.parametrize(
    "controls, message",
    [
        ("[{", "not valid JSON"),
        ('[{"kind": "Bogus"}]', "unknown control kind 'Bogus'"),
        (
            '[{"kind": "AStar", "concepts": ["cat"], "scale": -1}]',
            r"scale=-1 is not allowed: a finite number in \[0, 3\.4e\+38\]",
        ),
        ('[{"kind": "AttentionMaps", "tokens": ["dog"]}]', "dog"),
    ],
)
def test_bad_controls_are_refused_and_the_server_keeps_serving(served, controls, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        served.predict("a cat and a frog", controls, 0, 2, api_name="/generate")
    assert served.predict("a cat", "[]", 0, 1, api_name="/generate")[0]


def test_concurrent_requests_are_queued_and_none_is_lost(served):
    jobs = [served.submit("a cat and a frog", "[]", seed, 2, api_name="/generate") for seed in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: job.result(timeout=120), jobs))
    assert len(results) == 4 and all(r[0] for r in results)
    import numpy as np
    from PIL import Image

    pixels = [np.asarray(Image.open(r[0])) for r in results]
    assert not np.array_equal(pixels[0], pixels[1])  # each request its own seed


def test_video_models_show_the_frames_and_the_draft_panel():
    app = build_app(tiny_pipeline("wan"), model="tiny:wan", call_kwargs={**SIZE, "num_frames": 5}, steps=2)
    panels = {p.cls.kind: p for p in app.attnctl_panels}
    assert "DraftAttention" in panels
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, share=False)
    try:
        from gradio_client import Client
        from PIL import Image

        out = Client(app.local_url, verbose=False).predict("a cat", "[]", 0, 2, api_name="/generate")
        assert Image.open(out[4]).n_frames == 5
    finally:
        app.close()


def test_the_page_can_open_with_saved_controls():
    controls = [attnctl.AttentionMaps(["cat"]), attnctl.AStar(["cat", "frog"], scale=10.0)]
    app = build_app(
        tiny_pipeline("sd"), call_kwargs=dict(SIZE), steps=2, prompt="a cat and a frog", controls=controls
    )
    panels = {p.cls.kind: p for p in app.attnctl_panels}
    assert panels["AStar"].enable.value and not panels["PAG"].enable.value
    assert panels["AStar"].widgets["scale"].value == 10.0 and panels["AStar"].widgets["concepts"].value == [
        "cat",
        "frog",
    ]
    values = [w.value for p in app.attnctl_panels for w in [p.enable, *p.widgets.values()]]
    from attnctl.ui.app import _controls_from_widgets

    assert _controls_from_widgets(app.attnctl_panels, values) == [c.to_dict() for c in controls]


def test_a_flood_of_bad_and_oversized_requests_is_answered_at_once_while_good_ones_run(capfd):
    """4 good requests and 20 bad or oversized ones at the same time (loopback, bounded): every bad
    one is answered within 2 s with one error (the server logs one line for it, no traceback), the
    good ones complete, resident memory stays bounded, and a later request equals a fresh one."""
    import resource
    import time

    from gradio_client import Client

    from attnctl.ui.app import Limits

    limits = Limits(max_pixels=64 * 64, max_steps=4, max_iterations=5)
    app = build_app(tiny_pipeline("sd"), model="tiny:sd", call_kwargs=dict(SIZE), steps=2, limits=limits)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, share=False)
    try:
        client = Client(app.local_url, verbose=False)
        bad = [
            ("a cat", "[]", 0, 2, 100000, 100000),  # height x width past the server's pixels
            ("a cat", "[]", 0, 10**6, None, None),  # steps
            (
                "a cat",
                json.dumps([{"kind": "AttentionRegulation", "targets": ["cat"], "iterations": 10**3}]),
                0,
                2,
                None,
                None,
            ),
            ("a cat", json.dumps([{"kind": "SoftPAG", "heads": "/etc/passwd"}]), 0, 2, None, None),
            (
                "a cat",
                json.dumps([{"kind": "AStar", "concepts": ["cat"], "scale": "Infinity"}]),
                0,
                2,
                None,
                None,
            ),
            ("a cat", "[{", 0, 2, None, None),
            ("a cat", "[]", -1, 2, None, None),
        ] * 3
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = {}
        jobs = []
        for seed in range(4):
            jobs.append(("good", client.submit("a cat and a frog", "[]", seed, 2, api_name="/generate")))
        for args in bad[:20]:
            started[len(jobs)] = time.monotonic()
            jobs.append(("bad", client.submit(*args, api_name="/generate")))
        for i, (kind, job) in enumerate(jobs):
            if kind == "bad":
                with pytest.raises(Exception) as err:
                    job.result(timeout=30)
                assert time.monotonic() - started[i] <= 2.0, (i, str(err.value))
        goods = [job.result(timeout=120) for kind, job in jobs if kind == "good"]
        assert len(goods) == 4 and all(g[0] for g in goods)
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mib < 500
        import numpy as np
        from PIL import Image

        again = client.predict("a cat and a frog", "[]", 0, 2, api_name="/generate")
        assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(goods[0][0])))
    finally:
        app.close()
    logged = capfd.readouterr().err
    refused = [line for line in logged.splitlines() if line.startswith("attnctl ui: refused a request:")]
    assert len(refused) == 20 and "Traceback" not in logged
    assert any("not a path on the server" in line for line in refused)
    assert any("more than this server's 4096 pixels" in line for line in refused)
    assert any("seed=-1 is not allowed" in line for line in refused)


def _progress_step(line: str) -> int | None:
    """The step of a queue event stream's progress message (None for any other line)."""
    if not line.startswith("data:"):
        return None
    message = json.loads(line[5:])
    if message.get("msg") != "progress" or not message.get("progress_data"):
        return None
    return message["progress_data"][-1].get("index")


@pytest.mark.parametrize("leave", ["closes the stream", "cancels the job"])
def test_a_generation_stops_when_its_client_goes_away(leave, capfd):
    """A slow request (500 steps, about 12 s here) whose client goes away mid-run: it closes the
    queue's event stream (what a closed page does) or cancels the job (gradio_client's
    `job.cancel()`). The server stops that generation within a few steps and logs one line, the
    pipeline is left as before, and a later request equals the same request made before."""
    import re
    import time
    import uuid

    import httpx
    import numpy as np
    from gradio_client import Client
    from PIL import Image

    from attnctl.ui.app import Limits

    pipe = tiny_pipeline("sd")
    processors = dict(pipe.unet.attn_processors)
    limits = Limits(max_steps=500)
    app = build_app(pipe, model="tiny:sd", call_kwargs=dict(SIZE), steps=2, limits=limits)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, share=False)
    try:
        client = Client(app.local_url, verbose=False)
        controls = json.dumps([attnctl.AStar(["cat", "frog"]).to_dict()])
        request = ("a cat and a frog", controls, 5)
        before = client.predict(*request, 2, api_name="/generate")
        capfd.readouterr()
        if leave == "closes the stream":
            api = app.local_url.rstrip("/") + "/gradio_api"
            session = uuid.uuid4().hex
            fn_index = next(i for i, fn in app.fns.items() if fn.api_name == "generate")
            body = {"data": [*request, 500, None, None, True], "fn_index": fn_index, "session_hash": session}
            httpx.post(f"{api}/queue/join", json=body, timeout=10).raise_for_status()
            with httpx.stream("GET", f"{api}/queue/data", params={"session_hash": session}, timeout=30) as s:
                lines = s.iter_lines()
                assert any((_progress_step(line) or 0) >= 3 for line in lines), "no progress came"
            left = time.monotonic()  # the stream is closed here
        else:
            job = client.submit(*request, 500, api_name="/generate")
            deadline = time.monotonic() + 30
            while not any((p.index or 0) >= 3 for p in job.status().progress_data or ()):
                assert time.monotonic() < deadline and not job.done()
                time.sleep(0.02)
            job.cancel()
            left = time.monotonic()
        logged = ""
        while "attnctl ui: request cancelled:" not in logged and time.monotonic() - left < 10:
            time.sleep(0.05)
            logged += capfd.readouterr().err
        stopped = [line for line in logged.splitlines() if line.startswith("attnctl ui: request cancelled:")]
        assert len(stopped) == 1, logged
        why = "disconnected" if leave == "closes the stream" else "cancelled the request"
        found = re.fullmatch(rf".*: client {why} at step (\d+) of 500 \(controlled image\)", stopped[0])
        assert found and 3 <= int(found[1]) < 250, stopped[0]
        assert time.monotonic() - left < 10
        # the pipeline as before: attnctl's restore ran on the error raised at that step
        assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
        assert "step" not in vars(pipe.scheduler) and "forward" not in vars(pipe.unet)
        assert "encode_prompt" not in vars(pipe)
        after = client.predict(*request, 2, api_name="/generate")
        for i in (0, 1):  # the controlled image and the baseline
            assert np.array_equal(np.asarray(Image.open(after[i])), np.asarray(Image.open(before[i])))
    finally:
        app.close()
    logged += capfd.readouterr().err
    assert "Traceback" not in logged and "refused a request" not in logged
