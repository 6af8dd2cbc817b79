"""gallery.html: self-contained, escaped, and its sorting script runs in headless Chromium when available."""

import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from vizer.gallery import GalleryItem, render_gallery, thumbnail_data_uri, write_gallery

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


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (see docs/eval.md)")
def test_renders_and_sorts_in_headless_chromium(tmp_path):
    page = write_gallery(tmp_path / "gallery.html", items(), title="t", lower_is_better=[], default_metric="clip_s")
    dom = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert 'data-ready="1"' in dom, "the inline script ran"
    order = re.findall(r'<div class="id">(img/\d)</div>', dom)
    assert order == ["img/0", "img/2", "img/1"], "best change first: +0.3, 0, -0.5"
    assert re.findall(r'<td class="delta[^"]*">([^<]*)</td>', dom) == ["+0.300", "0.000", "-0.500"]
