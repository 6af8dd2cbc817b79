"""ShapesCap: a synthetic captioning benchmark where the truth of every caption is known.

Importing the package plugs it into the runner: the data source `shapes` and the local models
`tiny:shapes-clip` (grounding scorer), `tiny:shapes-judge` (independent judge) and `tiny:shapes-captioner`
(weak base VLM). A recipe asks for it with `plugins: [shapescap]`. See shapescap/README.md.
"""

from data.registry import register_source
from shapescap.captioner import build_shapes_captioner
from shapescap.clip import shapes_clip_path, shapes_judge_path
from shapescap.source import SHAPES_SOURCE
from vizer.model_ids import register_local_model

register_source(SHAPES_SOURCE)
register_local_model("shapes-clip", shapes_clip_path)
register_local_model("shapes-judge", shapes_judge_path)
register_local_model("shapes-captioner", build_shapes_captioner)
