"""The run directory OUT kept trustworthy across kills, crashes and reruns.

- One run at a time: OUT/.lock is an OS file lock (filelock), released by the kernel when its run dies, however it
  dies; its content names the owner (pid, host) in the refusal, and a stale lock is taken over.
- Resume picks the newest COMPLETE checkpoint (trainer_state.json readable and weights present); incomplete
  ones (a kill or a full disk mid-save) are set aside as checkpoint-N.incomplete, never resumed from.
- A rerun may change only what does not change the run (steps, logging, saving, eval): any other difference
  from OUT/recipe.yaml is refused before anything in OUT is touched.
- metrics.jsonl never holds a step twice and survives a torn last line.
- A rerun of a finished run (newest complete checkpoint at the last step, the adapter saved from it) changes
  nothing: transformers would otherwise train one step past max_steps (it checks only after a step).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from vizer.config import CHECKPOINTING_NAMES, RecipeError, checkpointing_spelling
from vizer.records import read_records

LOCK = ".lock"
# Keys a rerun into the same OUT may change: how long, how often to log or save, and how to evaluate.
RESUMABLE = (
    "name",
    "description",
    "eval",
    "eval_data",
    "monitor",  # watches the run, does not shape it: a run stopped by monitor.stop_on resumes without it
    "grpo.max_steps",
    "grpo.num_train_epochs",
    "grpo.logging_steps",
    "grpo.save_steps",
    "grpo.save_total_limit",
    "grpo.report_to",
    "grpo.log_completions",
    "grpo.num_completions_to_print",
    "vizer.max_steps",
    "vizer.num_train_epochs",
    "vizer.logging_steps",
    "vizer.save_steps",
    "vizer.save_total_limit",
    "vizer.report_to",
)
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")


# ---------------------------------------------------------------------------------------------- lock
# OUT/.lock is a filelock.FileLock: the OS lock (flock) is what says a run holds OUT, and the kernel drops it
# when its process dies, however it dies; the file's content (pid, host, start) only names the owner.
# What filelock alone would get wrong, so the content still decides there (tests/vizer/test_run_dir.py pins it):
# - a lock file that no OS lock backs but that names a live process on this host, or is empty and young: a run
#   of an earlier runner (pid file only) holds OUT, or is between creating and writing its lock; filelock would
#   hand OUT to a second run. Such a file is read as before: live pid -> refused; dead pid or an empty file older
#   than EMPTY_LOCK_S -> taken over.
# - a lock file written on another host: flock may not reach across hosts (NFS mounted with local_lock), so it
#   is never taken over from here; the refusal says to delete it if that run is gone.
# - a filesystem without flock: the content rules alone keep OUT.
OS_LOCKED = "flock"  # marks content written under the OS lock: once that lock is free, its writer is gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _in_use(out_dir: Path, path: Path, owner: dict, gone_advice: bool) -> RecipeError:
    return RecipeError(
        f"OUT {out_dir} is in use by pid {owner.get('pid', '?')} on {owner.get('host', '?')} "
        f"(since {owner.get('started', '?')}); wait for it, or train into another OUT"
        + (f" (delete {path} if that run is gone)" if gone_advice else "")
    )


def _os_lock(path: Path, out_dir: Path) -> FileLock | None:
    """OUT's OS lock, held; None where the filesystem has no flock. Refuses while another run holds it."""
    lock = FileLock(path, timeout=0, preserve_lock_file=True)  # the run removes its own file, content checked
    try:
        lock.acquire()
    except Timeout:
        owner = _settled_lock(path)
        if not owner:
            raise RecipeError(
                f"OUT {out_dir} is being taken by another run (its lock is not written yet); wait for it, or train "
                "into another OUT"
            ) from None
        raise _in_use(out_dir, path, owner, gone_advice=False) from None
    except OSError as err:
        if err.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            return None
        raise RecipeError(f"OUT {out_dir} is not writable ({err.strerror})") from None
    return lock


def _check_previous(out_dir: Path, path: Path, me: dict) -> None:
    """Under OUT's OS lock (or where there is none): refuse, or say why OUT is taken over, from what the lock
    file held before this run."""
    owner = _settled_lock(path)
    same_host = owner.get("host") == me["host"]
    if not owner:
        if not path.exists():  # its run ended meanwhile
            return
        if _age(path) <= EMPTY_LOCK_S:
            raise RecipeError(
                f"OUT {out_dir} is being taken by another run (its lock is not written yet); wait for it, or train "
                "into another OUT"
            )
        print(f"{out_dir}: taking over an empty lock left by a run killed while taking it")
    elif owner.get("lock") == OS_LOCKED and same_host:  # its OS lock is free: its run is gone, whatever its pid
        print(f"{out_dir}: taking over the lock of a run that is gone (pid {owner.get('pid', '?')})")
    elif same_host and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
        print(f"{out_dir}: taking over the lock of a run that is gone (pid {owner['pid']})")
    else:
        raise _in_use(out_dir, path, owner, gone_advice=not same_host)


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold OUT for this run; refuse (one line) while another live run holds it."""
    path = out_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    existed = path.exists()  # a file the OS lock just created holds no previous owner
    lock = _os_lock(path, out_dir)
    try:
        if existed:
            _check_previous(out_dir, path, me)
        path.write_text(json.dumps({**me, "lock": OS_LOCKED if lock else "pid"}))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    try:
        yield
    finally:
        if _read_lock(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
        if lock is not None:
            lock.release()


LOCK_WRITE_S = 2.0  # an owner writes its lock right after creating it: an empty one is waited for this long
EMPTY_LOCK_S = 30.0  # an empty lock older than this was left by a run killed between creating and writing it


def _settled_lock(path: Path) -> dict:
    """The lock's owner, read again for a moment while it is still empty (created, not yet written)."""
    deadline = time.monotonic() + LOCK_WRITE_S
    while not (owner := _read_lock(path)) and path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return owner


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _read_lock(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


# ---------------------------------------------------------------------------------------------- weights
def weight_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".bin") and p.name != "training_args.bin" and p.stat().st_size > 0
    )


def fingerprint(adapter: Path) -> str:
    """Identifies the trained weights, so a merged folder from an older adapter is rebuilt, not pushed."""
    digest = hashlib.sha256()
    for path in [*weight_files(adapter), adapter / "adapter_config.json"]:
        if path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("checkpoint-") or not name[len("checkpoint-") :].isdigit():
        return None
    return int(name[len("checkpoint-") :])


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete (trainer_state.json is written
    last by the trainer, so a readable one after the weights means the save finished)."""
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "unreadable trainer_state.json"
    if not any((checkpoint / w).is_file() and (checkpoint / w).stat().st_size > 0 for w in WEIGHTS):
        return "no model weights"
    return None


def last_complete_checkpoint(out_dir: Path, set_aside: bool = True) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are renamed checkpoint-N.incomplete (said)."""
    found = sorted(
        (p for p in out_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None),
        key=checkpoint_step,
        reverse=True,
    )
    for checkpoint in found:
        why = incomplete_reason(checkpoint)
        if why is None:
            return checkpoint
        if set_aside:
            aside = checkpoint.with_name(f"{checkpoint.name}.incomplete")
            if aside.exists():
                aside = checkpoint.with_name(f"{checkpoint.name}.incomplete-{int(time.time())}")
            checkpoint.rename(aside)
            print(f"set aside {checkpoint} ({why}: an interrupted save) as {aside.name}")
    return None


# ---------------------------------------------------------------------------------------------- finished runs
# What a checkpoint holds beyond the saved model (the adapter folder is the checkpoint without them).
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state")


def _same_weights(a: Path, b: Path) -> bool:
    names = [p.name for p in weight_files(a)]
    return (
        bool(names)
        and names == [p.name for p in weight_files(b)]
        and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    )


def _last_step(out_dir: Path, section: str, settings: dict) -> int | None:
    """The step the run ends at: max_steps, or for an epoch-based run the step count its newest checkpoint
    recorded, when the saved recipe trains the same epochs (None when that cannot be known)."""
    if settings.get("max_steps", -1) > 0:
        return settings["max_steps"]
    try:
        saved = (yaml.safe_load((out_dir / "recipe.yaml").read_text()) or {}).get(section) or {}
    except (OSError, yaml.YAMLError):
        return None
    same = all(saved.get(k) == settings.get(k) for k in ("max_steps", "num_train_epochs"))
    return -1 if same else None  # -1: the checkpoint's own max_steps


def finished_step(out_dir: Path, section: str, settings: dict, is_main: bool = True) -> int | None:
    """The step at which the run in OUT finished, or None when a rerun has training left to do. Finished: the
    newest complete checkpoint is at the last step (`settings`: the recipe's grpo:/vizer: section). An adapter
    missing or older than that checkpoint (a kill between the two saves) is written from the checkpoint."""
    if not out_dir.is_dir():
        return None
    checkpoint = last_complete_checkpoint(out_dir, set_aside=False)
    last = _last_step(out_dir, section, settings)
    if checkpoint is None or last is None:
        return None
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step = state.get("global_step", 0)
    if step < (state.get("max_steps", 0) if last == -1 else last):
        return None
    adapter = out_dir / "adapter"
    if is_main and not (adapter.is_dir() and _same_weights(adapter, checkpoint)):
        _adapter_from(checkpoint, adapter)
        print(f"{adapter}: written from {checkpoint.name} (the run ended before saving it)")
    return step


def _adapter_from(checkpoint: Path, adapter: Path) -> None:
    """The model part of a checkpoint as OUT/adapter, swapped in whole (a kill leaves the old one or the new)."""
    partial = adapter.with_name(adapter.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(checkpoint, partial, ignore=lambda _, names: [n for n in names if n.startswith(TRAINER_FILES)])
    if adapter.exists():
        shutil.rmtree(adapter)
    partial.rename(adapter)


# ---------------------------------------------------------------------------------------------- recipe
def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def _resumable(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def _one_spelling(recipe: dict) -> dict:
    """Gradient/activation checkpointing under one name: a run saved under either spelling resumes."""
    out = dict(recipe)
    for section in ("grpo", "vizer"):
        if isinstance(out.get(section), dict):
            with contextlib.suppress(RecipeError):  # two values: compared (and refused) as written
                out[section] = checkpointing_spelling(out[section], CHECKPOINTING_NAMES, section)
    return out


def recipe_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(keys that may change on resume and did, keys that must not change and did)."""
    a, b = _flatten(_one_spelling(saved)), _flatten(_one_spelling(new))
    # a key the saved recipe lacks entirely was added by a newer version of the runner (with its default):
    # resuming an older run is allowed, and the key is recorded like any allowed change
    added = sorted(k for k in set(b) - set(a) if not any(k.startswith(s + ".") for s in a))
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in added)
    return [*added, *(k for k in changed if _resumable(k))], [k for k in changed if not _resumable(k)]


def check_rerun(recipe: dict, out_dir: Path) -> list[str]:
    """Refuse a rerun whose recipe differs from OUT/recipe.yaml in what shapes the run; return the allowed
    changes (to record). Only matters once OUT holds a checkpoint to resume from."""
    path = out_dir / "recipe.yaml"
    if not path.is_file() or not any(out_dir.glob("checkpoint-*")):
        return []
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []  # unreadable: nothing to compare with; the resume itself will tell
    allowed, refused = recipe_changes(saved or {}, recipe)
    if refused:
        shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
        raise RecipeError(
            f"OUT {out_dir} holds a run of another recipe (differs in {shown}); resume it unchanged, or train "
            "into a new OUT"
        )
    _check_canary(out_dir, saved or {}, recipe)
    return allowed


def canary_settings(recipe: dict) -> dict | None:
    """What the canary's scores depend on beside the weights (None without a canary): its pictures, prompt,
    caption length and scorers. Recorded in each canary.jsonl line; a rerun may not change it."""
    count, data = (recipe.get("monitor") or {}).get("canary"), recipe.get("eval_data")
    if not count or not data:
        return None
    evaluation = recipe.get("eval") or {}
    return {
        "eval_data": {k: v for k, v in data.items() if k != "limit"},
        "pictures": min(count, data["limit"]) if data.get("limit") else count,
        "prompt": recipe.get("prompt"),
        **{f"eval.{k}": evaluation.get(k) for k in ("scorer", "judge", "max_new_tokens")},
    }


def _check_canary(out_dir: Path, saved: dict, recipe: dict) -> None:
    """A canary compares each measurement with its step 0: refuse a rerun that would measure it otherwise."""
    new = canary_settings(recipe)
    path = out_dir / "canary.jsonl"
    if new is None or not path.is_file():
        return
    first = next(iter(read_records(path)[0]), None)
    if first is None:
        return
    old = first[1].get("settings") or canary_settings(saved)  # lines of older runs carry none: the saved recipe's
    changed = sorted(k for k in new if old is not None and old.get(k) != new[k])
    if changed:
        raise RecipeError(
            f"OUT {out_dir} holds a canary measured since step {first[1].get('step', 0)} with other "
            f"{', '.join(changed)}: its scores would be compared with those; keep them, set monitor.canary=0 to "
            "go on without the canary, or train into a new OUT"
        )


def record_changes(out_dir: Path, allowed: list[str], saved: dict, new: dict) -> None:
    if not allowed:
        return
    a, b = _flatten(saved), _flatten(new)
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": {k: [a.get(k), b.get(k)] for k in allowed}}
    with (out_dir / "recipe-changes.jsonl").open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
    print("resuming with changed settings: " + ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in allowed))


# ---------------------------------------------------------------------------------------------- metrics
def trim_metrics(path: Path, step: int | None) -> None:
    """Keep the lines of steps up to `step` (all when None), each step once, and drop a torn last line."""
    if not path.is_file():
        return
    records, torn = read_records(path)
    kept, seen = [], set()
    for line, record in records:
        if "step" not in record:
            torn += 1
            continue
        key = (record["step"], tuple(sorted(record)))
        if (step is None or record["step"] <= step) and key not in seen:
            seen.add(key)
            kept.append(line)
    if torn:
        print(f"{path}: dropped {torn} unreadable line(s) (a write cut short)")
    path.write_text("".join(line + "\n" for line in kept))
