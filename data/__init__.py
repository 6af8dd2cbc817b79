"""Image sources that yield TRL's vision format.

Every source gives rows with a conversational `prompt` ([{type: image}, {type: text}]), an
`image` and an `image_id` — the group id: TRL passes no group id to rewards, so the
completions of one image are grouped by this column. `hub` and `folder` are built in; plugins
register more with `data.registry.register_source`.
"""

from data.sources import build_dataset, conversational_prompt

__all__ = ["build_dataset", "conversational_prompt"]
