"""gallery.html: self-contained, escaped, and its sorting script runs in headless Chromium when available."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from vizer.eval.gallery import GalleryItem, render_gallery, thumbnail_data_uri, write_gallery

CHROMIUM = Path("/usr/bin/chromium")


def items() -> list[GalleryItem]:
    colours = ["red", "green", "blue"]
    out = []
    for i, (b, t) in enumerate([(0.2, 0.5), (0.6, 0.1), (0.3, 0.3)]):
        out.append(
            GalleryItem(
                thumbnail_data_uri(Image.new("RGB", (64, 48), colours[i])),
                f"img/{i}",
                base=f"base caption {i}",
                tuned=f"tuned <b>{i}</b> & more",
                base_scores={"clip_s": b, "shapes/hallucination": 1.0},
                tuned_scores={"clip_s": t, "shapes/hallucination": float("nan")},
                references=["a ref"],
            )
        )
    return out


def test_page_is_self_contained_and_escaped():
    page = render_gallery(
        items(), title="run: base vs tuned", lower_is_better=["shapes/hallucination"], default_metric="clip_s"
    )
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page), "no external assets"
    assert "tuned &lt;b&gt;1&lt;/b&gt; &amp; more" in page and "<b>1</b>" not in page
    rows = re.findall(r"data-scores='([^']*)'", page)
    scores = json.loads(rows[0].replace("&quot;", '"'))
    assert scores == {"clip_s": [0.2, 0.5], "shapes/hallucination": [1.0, None]}  # NaN -> null
    assert "<option selected>clip_s</option>" in page


def test_a_partial_page_says_which_part_it_shows():
    page = render_gallery(items(), title="t", total=500, subset_note="the 3 largest CLIP-S changes")
    assert "<span id=shown>3</span> of 3 rows shown · 500 images evaluated" in page
    assert "<p class=note>the 3 largest CLIP-S changes</p>" in page
    whole = render_gallery(items(), title="t")
    assert "3 images evaluated" in whole and "class=note" not in whole


def visible_dom(page: Path, tmp_path: Path, view: str = "") -> str:
    """The DOM after the page's script ran in a real headless Chromium."""
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri() + view,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def shown_rows(dom: str) -> list[str]:
    rows = re.findall(r'<tr data-scores=[^>]*?(style="display: none;")?>.*?<div class="id">(img/\d)</div>', dom)
    return [image_id for hidden, image_id in rows if not hidden]


# CI installs Debian's chromium (.ci/run); elsewhere the test skips when it is missing.
@pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_renders_sorts_and_filters_in_headless_chromium(tmp_path):
    page = write_gallery(tmp_path / "gallery.html", items(), title="t", lower_is_better=[], default_metric="clip_s")
    dom = visible_dom(page, tmp_path)
    assert 'data-ready="1"' in dom, "the inline script ran"
    assert shown_rows(dom) == ["img/0", "img/2", "img/1"], "best change first: +0.3, 0, -0.5"
    assert re.findall(r'<td class="delta[^"]*">([^<]*)</td>', dom) == ["+0.300", "0.000", "-0.500"]
    assert '<span id="shown">3</span>' in dom

    worse = visible_dom(page, tmp_path, "#filter=worse")
    assert shown_rows(worse) == ["img/1"] and '<span id="shown">1</span>' in worse
    worst_first = visible_dom(page, tmp_path, "#order=worst&search=tuned%20%3Cb%3E2")
    assert shown_rows(worst_first) == ["img/2"]
