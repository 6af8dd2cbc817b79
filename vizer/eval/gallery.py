"""gallery.html: one self-contained page (thumbnails embedded as base64 PNG, inline CSS and JS, nothing fetched)
showing each image with its base and tuned captions side by side, their scores, and the change in a chosen
score; rows sort by that change and filter to improved / worse / unchanged or by text.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

THUMB_SIDE = 160


@dataclass
class GalleryItem:
    thumbnail: str  # data URI, see thumbnail_data_uri
    image_id: str
    base: str
    tuned: str
    base_scores: dict[str, float] = field(default_factory=dict)
    tuned_scores: dict[str, float] = field(default_factory=dict)
    references: list[str] = field(default_factory=list)


def thumbnail_data_uri(image: Image.Image, side: int = THUMB_SIDE) -> str:
    thumb = image.convert("RGB")
    if max(thumb.size) < side:  # small synthetic images: enlarge with sharp pixels rather than blur
        scale = side // max(thumb.size)
        thumb = thumb.resize((thumb.width * scale, thumb.height * scale), Image.Resampling.NEAREST)
    thumb.thumbnail((side, side))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(value: float | None) -> float | None:
    return None if value is None or value != value else value  # NaN is not valid JSON for JSON.parse


def _fmt(value: float | None) -> str:
    value = _finite(value)
    return "n/a" if value is None else f"{value:.3g}"


def _score_line(scores: dict[str, float]) -> str:
    return " · ".join(f"{html.escape(k)} {_fmt(v)}" for k, v in scores.items())


def _row(item: GalleryItem) -> str:
    pairs = {
        k: [_finite(item.base_scores[k]), _finite(item.tuned_scores[k])]
        for k in item.base_scores
        if k in item.tuned_scores
    }
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in item.references)
    return (
        f"<tr data-scores='{html.escape(json.dumps(pairs), quote=True)}'>"
        f'<td><img src="{item.thumbnail}" alt="{html.escape(item.image_id)}">'
        f"<div class=id>{html.escape(item.image_id)}</div>{f'<ul class=refs>{refs}</ul>' if refs else ''}</td>"
        f"<td><p class=cap>{html.escape(item.base) or '<i>(empty)</i>'}</p><div class=sc>{_score_line(item.base_scores)}</div></td>"
        f"<td><p class=cap>{html.escape(item.tuned) or '<i>(empty)</i>'}</p><div class=sc>{_score_line(item.tuned_scores)}</div></td>"
        "<td class=delta></td></tr>"
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-top:1px solid #ddd;padding:.5em;vertical-align:top;text-align:left}
img{max-width:160px;border:1px solid #ccc}.id,.sc,.refs{font-size:.8em;color:#666}
.cap{margin:0 0 .3em;font-size:1.05em}.delta{font-weight:bold;white-space:nowrap}.up{color:#070}.down{color:#b00}
.note{background:#fff6d5;padding:.4em .6em;border-radius:4px}
.controls{margin:1em 0;display:flex;gap:1em;flex-wrap:wrap;align-items:center}
"""

# Sort and filter by gain = change in the chosen score, sign-flipped where lower is better.
SCRIPT = """
const rows=[...document.querySelectorAll('#rows tr')], body=document.getElementById('rows');
const $=id=>document.getElementById(id);
function update(){
  const key=$('metric').value, sign=LOWER.includes(key)?-1:1, mode=$('filter').value;
  const order=$('order').value==='best'?-1:1, q=$('search').value.toLowerCase();
  for(const r of rows){
    const s=JSON.parse(r.dataset.scores)[key]; const d=s&&s[0]!==null&&s[1]!==null?s[1]-s[0]:NaN;
    r.gain=sign*d; const c=r.querySelector('.delta');
    c.textContent=isNaN(d)?'n/a':(d>0?'+':'')+d.toFixed(3); c.className='delta '+(r.gain>0?'up':r.gain<0?'down':'');
    const keep=(mode==='all'||(mode==='improved'&&r.gain>0)||(mode==='worse'&&r.gain<0)||(mode==='same'&&r.gain===0))
      &&(!q||r.textContent.toLowerCase().includes(q));
    r.style.display=keep?'':'none';
  }
  rows.slice().sort((a,b)=>(isNaN(a.gain)-isNaN(b.gain))||order*(a.gain-b.gain)).forEach(r=>body.appendChild(r));
  $('shown').textContent=rows.filter(r=>r.style.display!=='none').length;
}
for(const id of ['metric','filter','order','search'])$(id).addEventListener('input',update);
// a link can carry the view: gallery.html#metric=clip_s&filter=worse&order=worst&search=red
for(const [k,v] of new URLSearchParams(location.hash.slice(1)))if($(k))$(k).value=v;
update();document.body.dataset.ready='1';
"""


def render_gallery(
    items: Sequence[GalleryItem],
    *,
    title: str,
    lower_is_better: Sequence[str] = (),
    default_metric: str | None = None,
    total: int | None = None,
    subset_note: str | None = None,
) -> str:
    """The page; `total` (images evaluated) and `subset_note` (which ones the page holds) say when it is a part."""
    total = len(items) if total is None else total
    part = (
        f"<p class=note>{html.escape(subset_note or f'This page shows {len(items)} of the {total} evaluated images.')}</p>"
        if total > len(items)
        else ""
    )
    keys = [k for k in (items[0].base_scores if items else {}) if k in items[0].tuned_scores]
    default = default_metric if default_metric in keys else (keys[0] if keys else "")
    options = "".join(f"<option{' selected' if k == default else ''}>{html.escape(k)}</option>" for k in keys)
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
<div class=controls>
<label>score <select id=metric>{options}</select></label>
<label>show <select id=filter><option value=all>all</option><option value=improved>improved</option>
<option value=worse>worse</option><option value=same>unchanged</option></select></label>
<label>order <select id=order><option value=best>best change first</option>
<option value=worst>worst change first</option></select></label>
<label>text <input id=search type=search placeholder="filter captions"></label>
<span><span id=shown>{len(items)}</span> of {len(items)} rows shown · {total} images evaluated</span></div>{part}
<table><thead><tr><th>image</th><th>base</th><th>tuned</th><th>Δ</th></tr></thead>
<tbody id=rows>{"".join(_row(i) for i in items)}</tbody></table>
<script>const LOWER={json.dumps(list(lower_is_better))};{SCRIPT}</script></body></html>
"""


def write_gallery(path: Path, items: Sequence[GalleryItem], **kwargs) -> Path:
    path.write_text(render_gallery(items, **kwargs), encoding="utf-8")
    return path


CANARY_STYLE = """body{font:14px system-ui,sans-serif;margin:1em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;max-width:18em}th{background:#f4f4f4;position:sticky;top:0}
.id{font-size:11px;color:#666}.sc{font-size:11px;color:#555}.changed{background:#fff6d5}"""


def render_canary_page(thumbnails: dict[str, str], measurements: Sequence[dict], *, title: str) -> str:
    """canary.html: one row per canary picture, one column per measurement (`{"step", "images": [{"image_id",
    "caption", "clip_s", ...}]}`, as canary.jsonl holds them); a caption that changed since the previous
    measurement is highlighted."""
    steps = [m["step"] for m in measurements]
    by_step = [{im["image_id"]: im for im in m["images"]} for m in measurements]
    rows = []
    for image_id, uri in thumbnails.items():
        cells, before = [], None
        for seen in by_step:
            entry = seen.get(image_id)
            if entry is None:
                cells.append("<td></td>")
                continue
            scores = {k: v for k, v in entry.items() if k.startswith("clip_s")}
            changed = before is not None and entry["caption"] != before
            cells.append(
                f"<td{' class=changed' if changed else ''}><p>{html.escape(entry['caption']) or '<i>(empty)</i>'}</p>"
                f"<div class=sc>{_score_line(scores)}</div></td>"
            )
            before = entry["caption"]
        rows.append(
            f'<tr><td><img src="{uri}" alt="{html.escape(image_id)}"><div class=id>{html.escape(image_id)}</div></td>'
            + "".join(cells)
            + "</tr>"
        )
    head = "".join(f"<th>step {s}</th>" for s in steps)
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{CANARY_STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>The same pictures captioned greedily as training goes; highlighted: the caption changed since the previous step.</p>
<table><thead><tr><th>image</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></body></html>
"""
