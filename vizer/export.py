"""Sharing a finished run: merge its adapter into the base model, push it to the Hugging Face Hub.

python -m vizer merge RUN [--out DIR]            RUN/merged: a plain transformers model folder (+ processor)
python -m vizer push RUN --repo ID [--merged] [--private]   adapter (or merged model) + a generated model card
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from vizer.config import RecipeError
from vizer.model_ids import is_hub_id
from vizer.records import read_records
from vizer.run_dir import checkpoint_step, fingerprint, last_complete_checkpoint, weight_files

MERGE_INFO = "merged_from.json"  # provenance and the file list; also what lets a rerun replace the folder safely
MERGE_STARTED = ".vizer-merge"  # written first into OUT.partial: the folder is ours to clear on a rerun
# Left out of uploads: the card is regenerated; training_args.bin is a pickle only the trainer reads.
NOT_UPLOADED = ("README.md", "training_args.bin")
HARDWARE_FILES = ("hardware.json", "hardware.txt")  # read when a run records its machine
TAGS = ("vision-language", "image-captioning", "grpo", "trl")
HOW = {
    "grpo": "the model sampled several captions per image, reward plugins scored them, and GRPO "
    "(TRL's GRPOTrainer) moved it towards the better ones.",
    "vizer": "the hidden states of its own captions were aligned with the image's vision features "
    "through a small mapper (ViZer latent alignment).",
}


# ---------------------------------------------------------------------------------------------- the run
def check_run(run: Path, command: str) -> Path:
    """RUN's adapter folder, or one line saying what is missing."""
    if not run.is_dir():
        raise RecipeError(f"{command}: run directory not found: {run}")
    if not (run / "recipe.yaml").is_file():
        raise RecipeError(f"{command}: {run / 'recipe.yaml'} not found (is {run} a run directory?)")
    adapter = run / "adapter"
    if not adapter.is_dir():
        raise RecipeError(f"{command}: {adapter} not found (training has not finished: make train OUT={run})")
    if not weight_files(adapter) or not ((adapter / "adapter_config.json").is_file() or is_full_model(adapter)):
        raise RecipeError(f"{command}: {adapter} holds no adapter or model weights (an interrupted save?)")
    if not is_full_model(adapter):
        from vizer.models import check_adapter  # heavy imports (torch) only once RUN looks like a run

        check_adapter(adapter)
    return adapter


def is_full_model(folder: Path) -> bool:
    """A full fine-tune (lora.enabled: false) saves the whole model where the adapter would be."""
    return not (folder / "adapter_config.json").is_file() and (folder / "config.json").is_file()


def read_recipe(run: Path) -> dict:
    """The resolved recipe as saved by train (read as YAML: load_recipe would rename it after the file)."""
    recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict):
        raise RecipeError(f"{run / 'recipe.yaml'}: not a resolved recipe (no model section)")
    return recipe


# ---------------------------------------------------------------------------------------------- merge
def merge(run: Path, out: Path | None = None) -> Path:
    """Write the adapter merged into the full-precision base model (+ processor) to `out` (RUN/merged).

    A 4-/8-bit QLoRA run merges into the unquantized base: merging into quantized weights would round the
    LoRA update away. The merged model therefore matches the adapter on the full-precision base, which can
    differ slightly from the quantized model the adapter was trained against."""
    adapter = check_run(run, "merge")
    out = out or run / "merged"
    partial, replaced = (out.with_name(out.name + suffix) for suffix in (".partial", ".replaced"))
    for folder in (out, partial, replaced):  # before minutes of loading: refuse what is not ours to remove
        _check_out(folder, out)
    weights = fingerprint(adapter)  # the weights about to be loaded; compared again once the merge is saved
    from vizer.eval.caption import model_for_adapter  # heavy imports (torch, transformers) only once RUN is known good
    from vizer.models import load_with_adapter, pick_dtype

    model_cfg, _, _ = model_for_adapter(adapter)  # RUN/recipe.yaml's model section
    trained_quantization = model_cfg["quantization"]
    model_cfg = {**model_cfg, "quantization": "none"}
    dtype = str(pick_dtype(model_cfg["dtype"])).removeprefix("torch.")
    if is_full_model(adapter):
        print(f"merge: {adapter} is a full fine-tune; loading it ({dtype}) to save it as a plain model folder")
        loaded = load_with_adapter({**model_cfg, "id": str(adapter)}, None)
        model = loaded.model
    else:
        note = f", the run trained on it in {trained_quantization}" if trained_quantization != "none" else ""
        print(f"merge: loading base model {model_cfg['id']} in {dtype}, unquantized{note}")
        loaded = load_with_adapter(model_cfg, str(adapter))
        print(f"merge: merging the LoRA adapter {adapter} into it")
        model = loaded.model.merge_and_unload()
    # a crash mid-save never leaves a folder that looks done: save beside OUT, then swap it in
    if partial.exists():
        _remove_ours(partial)  # an earlier merge's (checked above)
    partial.mkdir(parents=True)
    (partial / MERGE_STARTED).write_text(f"{adapter}\n")
    print(f"merge: saving to {out}")
    model.save_pretrained(str(partial))
    # The processor carries the recipe's image knobs (model.processor). For Qwen2-VL the project's image-only
    # processor writes a folder that transformers' Qwen2VLProcessor loads; without torchvision,
    # AutoProcessor.from_pretrained returns only the tokenizer there, so load it with
    # vizer.qwen2vl_processor.load_qwen2vl_processor(folder) (what `model.id: <folder>` in a recipe does).
    loaded.processor.save_pretrained(str(partial))
    if fingerprint(adapter) != weights:  # e.g. a training run resumed into RUN saved a new adapter meanwhile
        _remove_ours(partial)
        raise RecipeError(
            f"merge: {adapter} changed while merging (is training writing to {run}?); merge again once it is done"
        )
    (partial / MERGE_STARTED).unlink()
    info = {
        "base_model": model_cfg["id"],
        "dtype": dtype,
        "trained_quantization": trained_quantization,
        "adapter_fingerprint": weights,
        # what a complete merge holds: a folder missing any of these is not current, whatever else it holds
        "files": {
            p.relative_to(partial).as_posix(): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()
        },
    }
    (partial / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    _swap_in(partial, out, replaced)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"merged model written to {out} ({size / 1e9:.2f} GB, {dtype})")
    return out


def _check_out(folder: Path, out: Path) -> None:
    """Refuse to replace a folder that `merge` did not write (`--out .` must never delete a project): OUT and
    the OUT.partial / OUT.replaced folders beside it that merge works in."""
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"merge: {folder} is a file; choose another --out")
    ours = (folder / MERGE_INFO).is_file() or (folder / MERGE_STARTED).is_file() or _leftover(folder, out)
    if folder.is_dir() and any(folder.iterdir()) and not ours:
        raise RecipeError(
            f"merge: {folder} exists and was not written by `vizer merge`; move it or choose another --out"
        )


def _leftover(folder: Path, out: Path) -> bool:
    """A removal of an older merge cut short by a kill (before its markers went last): every file left is one
    that OUT's own merge record names."""
    try:
        named = set(json.loads((out / MERGE_INFO).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    left = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return folder != out and set(left) <= named


def _remove_ours(folder: Path) -> None:
    """Remove a folder merge wrote with its markers last, so that a kill midway leaves it recognisably ours."""
    for entry in folder.iterdir():
        if entry.name in (MERGE_INFO, MERGE_STARTED):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for name in (MERGE_INFO, MERGE_STARTED):
        (folder / name).unlink(missing_ok=True)
    folder.rmdir()


def _swap_in(partial: Path, out: Path, replaced: Path) -> None:
    """Put the finished merge at OUT with renames only: a kill at any point leaves either the old complete
    folder, the new one, or none at OUT (push then merges again), never a half-deleted one."""
    if replaced.exists():
        _remove_ours(replaced)  # an interrupted earlier swap's (checked to be ours)
    if out.exists():
        out.rename(replaced)
    partial.rename(out)
    if replaced.exists():
        _remove_ours(replaced)


def is_current_merge(folder: Path, adapter: Path) -> bool:
    """True when `folder` is a complete merge of this adapter's weights: every file it recorded is there, whole."""
    try:
        info = json.loads((folder / MERGE_INFO).read_text())
        files = info["files"]
        complete = bool(files) and all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, torn, or an older merge's
        return False
    return complete and info.get("adapter_fingerprint") == fingerprint(adapter)


# ---------------------------------------------------------------------------------------------- model card
def steps_trained(run: Path) -> int | None:
    """The last step the run reached: the newest complete checkpoint or the last metrics.jsonl line,
    whichever is later (the final adapter is saved after the last logged step, not always at a checkpoint)."""
    steps = [step for step in (_checkpoint_step(run), _metrics_step(run)) if step is not None]
    return max(steps) if steps else None


def _checkpoint_step(run: Path) -> int | None:
    checkpoint = last_complete_checkpoint(run, set_aside=False)  # read-only: never renames anything
    return checkpoint_step(checkpoint) if checkpoint is not None else None


def _metrics_lines(run: Path) -> list[dict]:
    return [record for _, record in read_records(run / "metrics.jsonl")[0]]  # a torn last line left out


def _metrics_step(run: Path) -> int | None:
    steps = [m["step"] for m in _metrics_lines(run) if isinstance(m.get("step"), int)]
    return max(steps) if steps else None


def hardware_line(run: Path, recipe: dict) -> str:
    """What the run recorded about its machine, else what can be said from the run directory."""
    for name in HARDWARE_FILES:
        path = run / name
        if path.is_file():
            text = path.read_text(errors="replace").strip()
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(text)
                if isinstance(data, dict):
                    text = ", ".join(f"{k}: {v}" for k, v in data.items())
            return " ".join(text.split())
    model = recipe["model"]
    known = [f"model dtype {model.get('dtype', 'auto')}", f"quantization {model.get('quantization', 'none')}"]
    runtime = next((m["train_runtime"] for m in reversed(_metrics_lines(run)) if "train_runtime" in m), None)
    if isinstance(runtime, (int, float)):
        known.append(f"last training session {runtime / 60:.1f} min")
    return f"not recorded ({', '.join(known)})"


def _front_matter(base: str, library: str, peft: bool) -> list[str]:
    lines = ["---"]
    if is_hub_id(base):
        lines.append(f"base_model: {base}")
    lines += [f"library_name: {library}", "pipeline_tag: image-text-to-text", "tags:"]
    lines += [f"- {tag}" for tag in (*TAGS, *(("lora",) if peft else ()))]
    return [*lines, "---", ""]


def _data_line(data: dict) -> str:
    parts = [f"source `{data.get('source')}`"]
    for key in ("id", "path", "split", "limit"):
        if data.get(key) is not None:
            parts.append(f"{key} `{data[key]}`")
    return ", ".join(parts) + " (images only: no captions are used in training)"


def _rewards_table(rewards: list[dict]) -> list[str]:
    lines = ["| reward | weight | options |", "|---|---:|---|"]
    for entry in rewards:
        options = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("name", "weight"))
        lines.append(f"| {entry['name']} | {entry.get('weight', 1.0)} | {options} |")
    return lines


def _eval_section(run: Path) -> list[str]:
    results = run / "eval" / "results.md"
    if not results.is_file():
        where = run if not run.is_absolute() else "<run dir>"  # an absolute path would publish local folders
        return [f"Not evaluated yet: `make eval RUN={where}` writes eval/results.md; push again to include it here."]
    lines = results.read_text(errors="replace").strip().splitlines()
    if lines and lines[0].startswith("# "):  # the heading names the local run path
        lines = lines[1:]
    return [("##" + line) if line.startswith("#") else line for line in lines]


def _usage(base: str, repo: str, weights: str, prompt: str) -> list[str]:
    if weights == "peft":
        load = [
            "from peft import PeftModel",
            "from PIL import Image",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            f'base = AutoModelForImageTextToText.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'processor = AutoProcessor.from_pretrained("{repo}")',
        ]
    else:
        load = [
            "from PIL import Image",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            f'model = AutoModelForImageTextToText.from_pretrained("{repo}")',
            f'processor = AutoProcessor.from_pretrained("{repo}")',
        ]
    return [
        "```python",
        *load,
        "",
        f"messages = [{{'role': 'user', 'content': [{{'type': 'image'}}, {{'type': 'text', 'text': {prompt!r}}}]}}]",
        "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(text=[text], images=[[Image.open("photo.jpg").convert("RGB")]], return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        'print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])',
        "```",
    ]


def model_card(run: Path, merged: bool, repo: str | None = None) -> str:
    """The README.md uploaded with the adapter (merged=False) or the merged model; reads RUN only."""
    recipe = read_recipe(run)
    model, base = recipe["model"], recipe["model"]["id"]
    peft = not merged and not is_full_model(run / "adapter")
    title = repo.rsplit("/", 1)[-1] if repo else recipe.get("name", "caption model")
    repo = repo or "<repo id>"
    objective = recipe.get("objective", "grpo")
    section = recipe.get("vizer" if objective == "vizer" else "grpo") or {}
    steps = steps_trained(run)
    planned = f" of {section['max_steps']} planned" if section.get("max_steps") else ""
    lora = model.get("lora") or {}
    if is_full_model(run / "adapter"):
        what = "a full fine-tune of"
    elif merged:
        what = "a LoRA adapter merged into"
    else:
        what = f"a LoRA adapter (r={lora.get('r')}, alpha={lora.get('alpha')}, targets {lora.get('targets')}) for"
    lines = _front_matter(base, "peft" if peft else "transformers", peft)
    lines += [
        f"# {title}",
        "",
        f"Image captioning: {what} `{base}`, trained without caption labels (objective `{objective}`): "
        + HOW[objective if objective in HOW else "grpo"],
        "",
        "## Training",
        "",
        f"- recipe: `{recipe.get('name', '?')}`" + (f": {recipe['description']}" if recipe.get("description") else ""),
        f"- base model: `{base}` (dtype {model.get('dtype')}, quantization {model.get('quantization')} in training"
        + (", merged into the unquantized base" if merged else "")
        + ")",
        f"- training data: {_data_line(recipe.get('data') or {})}",
        f"- prompt: {recipe.get('prompt')!r}",
        f"- steps trained: {steps if steps is not None else 'unknown'}{planned}",
        f"- hardware: {hardware_line(run, recipe)}",
        "",
    ]
    if recipe.get("rewards") and objective == "grpo":  # a vizer run trains on its mapper, not on rewards
        lines += ["### Rewards", "", *_rewards_table(recipe["rewards"]), ""]
    lines += ["## Evaluation", "", *_eval_section(run), "", "## Usage", ""]
    lines += _usage(base, repo, "peft" if peft else "transformers", recipe.get("prompt") or "Describe this image.")
    if model.get("family") == "qwen2_vl" or "qwen" in str(base).lower():
        lines += ["", "Qwen2-VL's processor needs torchvision; without it AutoProcessor returns only the tokenizer."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- push
def push(run: Path, repo: str, merged: bool = False, private: bool = False) -> str:
    """Upload the adapter (or RUN/merged, built first when missing or stale) with a model card; returns the URL."""
    import huggingface_hub

    _require_token(huggingface_hub)  # before a merge that may take minutes
    adapter = check_run(run, "push")
    folder = adapter
    if merged:
        folder = run / "merged"
        if not is_current_merge(folder, adapter):
            print(f"push: {folder} is missing or older than the adapter; merging first")
            merge(run, folder)
    card = model_card(run, merged, repo)
    api = huggingface_hub.HfApi()
    with _staged(folder, card, run) as stage:
        print(f"push: uploading {folder} + README.md to {repo}" + (" (private)" if private else ""))
        try:
            url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo,
                folder_path=str(stage),
                repo_type="model",
                commit_message=f"vizer push {run.name}" + (" (merged)" if merged else ""),
            )
        except _hub_errors(huggingface_hub) as err:
            raise RecipeError(f"push: {repo}: {_first_line(err)}{_login_hint(err)}") from None
    print(f"pushed to {url}")
    return str(url)


def _require_token(huggingface_hub) -> None:
    try:
        token = huggingface_hub.get_token()
    except Exception as err:  # e.g. a failed OIDC exchange: still one line
        raise RecipeError(f"push: cannot read a Hugging Face token ({_first_line(err)})") from None
    if not token:
        raise RecipeError("push: no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token)")


def _hub_errors(huggingface_hub) -> tuple[type[BaseException], ...]:
    # HfHubHTTPError and offline mode are OSErrors; a bad repo id is a ValueError; network failures are
    # the HTTP client's own errors.
    http = getattr(huggingface_hub.errors, "HTTPError", None)
    return (OSError, ValueError, *((http,) if isinstance(http, type) else ()))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _login_hint(err: BaseException) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403) or "401" in str(err) or "403" in str(err):
        return " (check the token's write access: `hf auth login` or HF_TOKEN)"
    return ""


@contextlib.contextmanager
def _staged(folder: Path, card: str, run: Path) -> Iterator[Path]:
    """A temporary copy of `folder` with the card as README.md: files are hard links where the filesystem
    allows (a merged model can be gigabytes), so the run directory itself is never changed."""
    try:
        tmp = tempfile.TemporaryDirectory(prefix=".push-", dir=run)
    except OSError:  # read-only run directory: stage elsewhere (copies)
        tmp = tempfile.TemporaryDirectory(prefix="vizer-push-")
    with tmp as name:
        stage = Path(name)
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if not path.is_file() or rel.as_posix() in NOT_UPLOADED:
                continue
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        (stage / "README.md").write_text(card, encoding="utf-8")
        yield stage
