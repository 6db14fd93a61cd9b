"""The HTML report: self-contained, escaped, filters work in headless Chromium, overlays visible."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgym.cli import main
from medgym.traces import read_traces
from medgym.traces.report import ANSWER_COLOUR, TRUTH_COLOUR, draw_boxes

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def _reddish(img: np.ndarray) -> int:
    r, g, b = (img[..., k].astype(int) for k in range(3))
    return int(((r > 170) & (r - g > 80) & (r - b > 80)).sum())


@pytest.fixture(scope="module")
def report(mixed_traces, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(mixed_traces), "--out", str(out)]) == 0
    return out


def test_the_report_is_self_contained_and_escaped(report, mixed_traces):
    html = report.read_text()
    # Images inline, nothing fetched from elsewhere.
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', html)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    # Model text is shown escaped, never as markup.
    assert "<script>window.__xss" not in html
    assert "&lt;script&gt;window.__xss = true&lt;/script&gt;" in html
    assert html.count('<section class="episode') == len(read_traces(mixed_traces).episodes)


def test_boxes_are_drawn_on_the_question_image():
    img = np.zeros((64, 64, 3), np.uint8)
    out = draw_boxes(img, truth=[4, 4, 30, 30], answer=[20, 20, 60, 60])
    assert tuple(out[4, 10]) == TRUTH_COLOUR and tuple(out[20, 40]) == ANSWER_COLOUR
    assert out[40, 40].sum() == 0  # outlines only
    assert np.array_equal(draw_boxes(img, None, [5, 5, 5, 9]), img)  # an empty box draws nothing


def test_the_report_in_headless_chromium(report, mixed_traces, chromium):
    from playwright.sync_api import sync_playwright

    episodes = read_traces(mixed_traces).episodes
    wrong = sum(e.score.get("answer") != 1.0 for e in episodes)
    failed = sum(any(c.error for s in e.steps for c in s.calls) for e in episodes)
    assert 0 < wrong < len(episodes) and failed > 0

    with sync_playwright() as p:
        browser = chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1500})
            page.goto(report.as_uri())
            visible = page.locator("section.episode:visible")
            assert visible.count() == len(episodes)
            assert page.evaluate("window.__xss") is None  # the escaped <script> never ran

            page.click("#filter-wrong")
            assert visible.count() == wrong
            assert page.inner_text("#shown-count") == str(wrong)
            assert all(v == "false" for v in visible.evaluate_all("els => els.map(e => e.dataset.correct)"))

            page.click("#filter-failed")  # wrong AND failed tools
            both = sum(
                e.score.get("answer") != 1.0 and any(c.error for s in e.steps for c in s.calls) for e in episodes
            )
            assert visible.count() == both
            page.click("#filter-failed")
            assert visible.count() == wrong

            # Every image decoded in the browser (none broken).
            broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
            assert broken == 0

            ARTIFACTS.mkdir(exist_ok=True)
            shot_path = ARTIFACTS / "report.png"
            page.screenshot(path=str(shot_path), full_page=True)
            shot = np.asarray(Image.open(shot_path).convert("RGB"))

            # The first wrong episode: its question image carries the red answer box, its
            # segment image the red mask overlay. Count reddish pixels where they are drawn.
            first = visible.first
            qbox = first.locator("img.question-image").first.bounding_box()
            tbox = first.locator("img.tool-segment").first.bounding_box()
            assert first.locator("img.tool-zoom").count() == 1  # the crop is shown too
            for box in (qbox, tbox):
                assert box is not None and box["y"] + box["height"] <= shot.shape[0], box
                x0, y0 = int(box["x"]), int(box["y"])
                region = shot[y0 : y0 + int(box["height"]), x0 : x0 + int(box["width"])]
                assert _reddish(region) > 100, (box, _reddish(region))
            # The same count on the stored picture, without the drawn boxes, is far smaller.
            plain = np.asarray(Image.open(io.BytesIO(_first_question_png(mixed_traces, episodes))).convert("RGB"))
            assert _reddish(plain) < 20
        finally:
            browser.close()


def _first_question_png(path: Path, episodes) -> bytes:
    ep = next(e for e in episodes if e.score.get("answer") != 1.0)
    return (path.parent / "images" / f"{ep.header.image}.png").read_bytes()
