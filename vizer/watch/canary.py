"""The canary set: the same few held-out pictures captioned greedily by the model in training, every N steps.

The first `monitor.canary` images of the recipe's `eval_data` are captioned as `make eval` captions them
(greedy, `eval.max_new_tokens`) with the adapter being trained, at step 0 and every `monitor.every` steps, and
scored with the eval's CLIP-S scorer and judge. The means go into the trainer's logs (`canary/clip_s`,
`canary/clip_s_judge`: metrics.jsonl, TensorBoard); the captions, one line per measurement, into
OUT/canary.jsonl: {"step": N, "images": [{"image_id", "caption", "clip_s", "clip_s_judge"}, ...], "settings": {...}}
(`settings`: pictures, prompt, caption length and scorers, which a rerun may not change), and as a page,
OUT/canary.html: each picture in a row, its caption at each canary step across.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback

from data.images import to_rgb
from vizer.eval.caption import Decoding, generate_captions
from vizer.eval.evaluate import EvalImage, clip_scorers, load_eval_set
from vizer.eval.gallery import render_canary_page, thumbnail_data_uri
from vizer.eval.metrics import clip_scores
from vizer.families import Family
from vizer.models import LoadedModel, keep_4bit_layout
from vizer.run_dir import canary_settings

PREFIX = "canary/"


def canary_images(recipe: dict) -> list[EvalImage]:
    """The first `monitor.canary` readable images of eval_data (none without eval_data or with canary 0)."""
    count, data = recipe["monitor"]["canary"], recipe["eval_data"]
    if not count or data is None:
        return []
    limit = min(count, data["limit"]) if data["limit"] else count  # read no more of a large eval set than needed
    return load_eval_set({**data, "limit": limit}, recipe["prompt"])[0][:count]


def paired_standard_error(changes: list[float]) -> float:
    """The standard error of the mean of per-image changes (0 with fewer than two): how far the canary's mean
    moves by chance when a few of its greedy captions change between checkpoints."""
    if len(changes) < 2:
        return 0.0
    mean = sum(changes) / len(changes)
    variance = sum((c - mean) ** 2 for c in changes) / (len(changes) - 1)
    return (variance / len(changes)) ** 0.5


def _scores_by_image(rows: list[dict]) -> dict[str, dict[str, float]]:
    keys = {k for r in rows for k in r if k.startswith("clip_s")}
    return {k: {r["image_id"]: r[k] for r in rows if k in r} for k in keys}


class Canary(TrainerCallback):
    """Captions and scores the canary images at the first step and every `every` steps after; give it the
    trainer (`bind`) before training: its logs go through the trainer's own `log`."""

    def __init__(
        self,
        items: list[EvalImage],
        recipe: dict,
        family: Family,
        path: Path,
        device: str,
    ) -> None:
        self.items, self.family, self.path = items, family, path
        self.every, self.prompt = recipe["monitor"]["every"], recipe["prompt"]
        self.settings = canary_settings(recipe)  # recorded with each measurement: a rerun may not change them
        # greedy, as `make eval` decodes by default: one caption per image, the same for the same weights
        self.decoding = Decoding(
            max_new_tokens=recipe["eval"]["max_new_tokens"], batch_size=recipe["eval"]["batch_size"]
        )
        self.scorers = clip_scorers(recipe["eval"], device)  # loaded once, for the whole run
        self.trainer: Trainer | None = None
        self.started = False
        self.measurements: list[dict] | None = None  # canary.jsonl's lines, read once (a resumed run's too)
        self.thumbnails: dict[str, str] | None = None  # image id -> data URI, made at the first page

    def bind(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        # The first step of this launch: step 0 of a new run. (A resumed run's state is loaded after
        # on_train_begin, so the step is known only here; it measured its checkpoint's steps already.)
        if not self.started:
            self.started = True
            if state.global_step == 0:
                self.measure(state.global_step, kwargs["model"], kwargs["processing_class"])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.measure(state.global_step, kwargs["model"], kwargs["processing_class"])

    def history(self) -> list[dict]:
        """This run's measurements so far: canary.jsonl as a resumed run left it, then those of this launch."""
        if self.measurements is None:
            lines = self.path.read_text().splitlines() if self.path.is_file() else []
            self.measurements = [json.loads(line) for line in lines]
        return self.measurements

    def measure(self, step: int, model: torch.nn.Module, processor: Any) -> dict[str, float]:
        """Caption, score, log and record the canary set at `step`; the logged means, and the standard error of
        the mean change since the first measurement (per image, the same pictures: `canary/<score>_se`)."""
        rows = self.caption(model, processor)
        history = self.history()
        first = _scores_by_image(history[0]["images"]) if history else {}
        logs = {}
        for suffix in self.scorers:
            key = f"clip_s{suffix}"
            values = [r[key] for r in rows]
            logs[f"{PREFIX}{key}"] = sum(values) / len(values)
            before = first.get(key, {})
            changes = [r[key] - before[r["image_id"]] for r in rows if r["image_id"] in before]
            logs[f"{PREFIX}{key}_se"] = paired_standard_error(changes)
        history.append({"step": step, "images": rows, "settings": self.settings})
        if PartialState().is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(history[-1]) + "\n")
            self.write_page(history)
        if self.trainer is not None:
            # The transformers Trainer's own log: TRL's would also take (and clear) the metrics its steps
            # gathered since the last logging step. Logging clears `should_log`, which this step's own
            # training log (due after on_step_end) still needs.
            due = self.trainer.control.should_log
            Trainer.log(self.trainer, dict(logs))
            self.trainer.control.should_log = due
        return logs

    def write_page(self, measurements: list[dict]) -> None:
        """OUT/canary.html from every measurement so far (a resumed run's too)."""
        if self.thumbnails is None:
            self.thumbnails = {it.image_id: thumbnail_data_uri(to_rgb(it.source)) for it in self.items}
        page = render_canary_page(self.thumbnails, measurements, title=f"canary: {self.path.parent.name}")
        self.path.with_suffix(".html").write_text(page, encoding="utf-8")

    def caption(self, model: torch.nn.Module, processor: Any) -> list[dict]:
        """Per canary image (all processes gathered, in order): its caption and scores. Each process captions
        its share; all get the same rows, so the monitor decides alike everywhere."""
        state = PartialState()
        with state.split_between_processes(list(range(len(self.items)))) as mine:
            share = [self.items[i] for i in mine]
            captions = self._generate(model, processor, share) if share else []
            rows = [{"image_id": it.image_id, "caption": c} for it, c in zip(share, captions)]
            for suffix, scorer in self.scorers.items():
                if not share:
                    break
                scores = clip_scores(scorer, [it.source for it in share], captions, [[]] * len(share))[0]
                for row, score in zip(rows, scores):
                    row[f"clip_s{suffix}"] = float(score)
        return gather_object(rows) if state.num_processes > 1 else rows

    def _generate(self, model: torch.nn.Module, processor: Any, items: list[EvalImage]) -> list[str]:
        was_training = model.training
        keep_4bit_layout(model)  # an eval-mode forward must not repack 4-bit weights that train on after
        model.eval()
        try:
            # no_grad, not generate_captions' inference_mode: a tensor a module caches during this pass must
            # stay usable by the training forwards after it
            with torch.no_grad():
                loaded = LoadedModel(model=model, processor=processor, family=self.family, path="")
                captions = generate_captions.__wrapped__(
                    loaded, [it.source for it in items], self.prompt, self.decoding, desc="canary"
                )
        finally:
            model.train(was_training)
        return [texts[0] for texts in captions]
