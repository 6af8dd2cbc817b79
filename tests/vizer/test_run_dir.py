"""A night of training survives kills, full disks, a second run and a changed recipe (the run directory)."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from test_train import tiny_overrides

import vizer.train as runner
from vizer.config import RecipeError, load_recipe
from vizer.run_dir import trim_metrics

ROOT = Path(__file__).resolve().parents[2]


def recipe(*extra: str) -> dict:
    return load_recipe("tiny-shapes", [*tiny_overrides("tiny-shapes"), "grpo.save_steps=2", *extra])


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r})
os.environ["HF_HUB_OFFLINE"] = "1"
import transformers
import shapescap  # noqa: F401
from test_train import tiny_overrides
from vizer.config import load_recipe
from vizer.train import train

original = transformers.Trainer._save_optimizer_and_scheduler

def die_mid_save(self, output_dir):  # the weights of checkpoint-4 are written, its state is not
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir)

transformers.Trainer._save_optimizer_and_scheduler = die_mid_save
overrides = [*tiny_overrides("tiny-shapes"), "grpo.save_steps=2", "grpo.max_steps=6"]
train(load_recipe("tiny-shapes", overrides), __import__("pathlib").Path({out!r}))
"""


def test_a_kill_mid_save_leaves_a_checkpoint_that_is_set_aside_not_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    script = KILL_DURING_SAVE.format(root=str(ROOT), out=str(out))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'vizer'}:{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()
    assert (out / ".lock").is_file(), "a killed run leaves its lock behind"

    capsys.readouterr()
    runner.train(recipe("grpo.max_steps=6"), out)  # the stale lock is taken over, checkpoint-4 set aside
    said = capsys.readouterr().out
    assert "taking over the lock of a run that is gone" in said
    assert f"set aside {out / 'checkpoint-4'} (no trainer_state.json" in said
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in said
    assert (out / "checkpoint-4.incomplete").is_dir() and (out / "checkpoint-6" / "trainer_state.json").is_file()
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    assert not (out / ".lock").exists()


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "started": "t"}))
        with pytest.raises(RecipeError, match=rf"^OUT {out} is in use by pid {sleeper.pid} on "):
            runner.train(recipe("grpo.max_steps=2"), out)
        assert not (out / "recipe.yaml").exists(), "refused before touching OUT"
    finally:
        sleeper.kill()
        sleeper.wait()


def snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    """Every file in OUT with its modification time and content."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}


def test_a_lock_read_before_its_owner_wrote_it_names_the_owner_once_written(tmp_path):
    import threading

    from vizer.run_dir import locked

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").touch()  # created by a live run that has not written its pid yet
    owner = {"pid": os.getppid(), "host": os.uname().nodename, "started": "t"}  # alive, on this host
    later = threading.Timer(0.3, lambda: (out / ".lock").write_text(json.dumps(owner)))
    later.start()
    with pytest.raises(RecipeError, match=rf"^OUT {out} is in use by pid {owner['pid']} on ") as err, locked(out):
        pass
    later.join()
    assert "delete" not in str(err.value), "never advise deleting a live run's lock"


def test_an_empty_lock_is_waited_for_then_taken_over_only_when_old(tmp_path, capsys, monkeypatch):
    import vizer.run_dir as run_dir

    monkeypatch.setattr(run_dir, "LOCK_WRITE_S", 0.1)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").touch()
    taken = r"is being taken by another run \(its lock is not written yet\)"
    with pytest.raises(RecipeError, match=taken), run_dir.locked(out):
        pass
    os.utime(out / ".lock", (1, 1))  # empty for long: its run died between creating and writing it
    with run_dir.locked(out):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert "taking over an empty lock" in capsys.readouterr().out and not (out / ".lock").exists()


def test_a_changed_recipe_is_refused_before_touching_out_and_allowed_changes_are_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    runner.train(recipe("grpo.max_steps=2"), out)
    before = (out / "recipe.yaml").read_text()

    finished = snapshot(out)
    capsys.readouterr()
    runner.train(recipe("grpo.max_steps=2"), out)  # the same command again: transformers would train step 3
    assert f"{out}: already finished at step 2; nothing to do" in capsys.readouterr().out
    assert snapshot(out) == finished, "a rerun of a finished run changes nothing in OUT"
    with pytest.raises(RecipeError, match=r"differs in grpo\.learning_rate, model\.lora\.r\); resume it unchanged"):
        runner.train(recipe("grpo.max_steps=4", "model.lora.r=4", "grpo.learning_rate=0.01"), out)
    assert (out / "recipe.yaml").read_text() == before

    runner.train(recipe("grpo.max_steps=4"), out)  # more steps: a resume
    change = json.loads((out / "recipe-changes.jsonl").read_text().splitlines()[-1])
    assert change["changed"] == {"grpo.max_steps": [2, 4]}
    assert yaml.safe_load((out / "recipe.yaml").read_text())["grpo"]["max_steps"] == 4
    assert steps(out) == [1, 2, 3, 4]

    # killed between the last checkpoint and the adapter's save: the adapter comes from the checkpoint
    (out / "adapter" / "adapter_model.safetensors").unlink()
    runner.train(recipe("grpo.max_steps=4"), out)
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert adapter == (out / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    assert steps(out) == [1, 2, 3, 4] and not (out / "checkpoint-5").exists()


def test_an_epoch_based_run_is_finished_at_the_steps_its_checkpoint_recorded(tmp_path):
    from vizer.run_dir import finished_step

    out, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoint-6"
    for folder in (checkpoint, out / "adapter"):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 6, "max_steps": 6}))
    (out / "recipe.yaml").write_text(yaml.safe_dump({"grpo": {"num_train_epochs": 2}}))
    assert finished_step(out, "grpo", {"num_train_epochs": 2}) == 6
    assert finished_step(out, "grpo", {"num_train_epochs": 3}) is None, "more epochs: a resume"
    assert finished_step(out, "grpo", {"max_steps": 7}) is None
    assert finished_step(out, "grpo", {"max_steps": 6}) == 6


class SignalAtStep2(runner.MetricsJsonl):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; before any scheduled save


def test_ctrl_c_saves_where_it_stopped_and_the_rerun_resumes_there(tmp_path, monkeypatch):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN when started in the background
    monkeypatch.setattr(runner, "MetricsJsonl", SignalAtStep2)
    with pytest.raises(runner.Interrupted) as stopped:
        runner.train(recipe("grpo.max_steps=6", "grpo.save_steps=100"), out)
    monkeypatch.undo()
    step = stopped.value.step
    assert step in (2, 3) and (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert "re-run the same command to resume" in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is before, "handlers restored"
    runner.train(recipe("grpo.max_steps=6", "grpo.save_steps=100"), out)
    assert steps(out) == [1, 2, 3, 4, 5, 6], "no step twice"


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    import transformers

    original = transformers.Trainer._save_optimizer_and_scheduler

    def full(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", full)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RecipeError, match=r"^disk full while writing to .*; the last complete checkpoint is intact"):
        runner.train(recipe("grpo.max_steps=6"), out)
    assert signal.getsignal(signal.SIGINT) is before, "restored after a failed run too"
    monkeypatch.undo()
    runner.train(recipe("grpo.max_steps=6"), out)
    assert (out / "checkpoint-4.incomplete").is_dir() and steps(out) == [1, 2, 3, 4, 5, 6]


def test_a_torn_metrics_line_is_dropped_not_fatal(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    trim_metrics(path, 2)
    assert path.read_text().splitlines() == ['{"step": 1, "loss": 0.5}', '{"step": 2, "loss": 0.4}']
    assert "dropped 1 unreadable line" in capsys.readouterr().out


def test_out_that_is_a_file_is_one_line(tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(RecipeError, match=r"is a file, not a directory"):
        runner.train(recipe("grpo.max_steps=2"), out)


def test_a_read_only_out_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(RecipeError, match=rf"^OUT {out} is not writable \(Read-only file system\)$"):
        runner.train(recipe("grpo.max_steps=2"), out)


def test_a_run_saved_by_an_older_runner_resumes_with_the_new_keys_recorded():
    from vizer.run_dir import recipe_changes

    new = {
        "model": {"id": "m", "lora": {"r": 8}, "share_vision": "auto"},
        "grpo": {"max_steps": 4},
        "objective": "grpo",
    }
    old = {"model": {"id": "m", "lora": {"r": 8}}, "grpo": {"max_steps": 2}}
    assert recipe_changes(old, new) == (["model.share_vision", "objective", "grpo.max_steps"], [])
    assert recipe_changes({**old, "model": {"id": "m", "lora": {"r": 4}}}, new)[1] == ["model.lora.r"]


def test_the_os_lock_decides_a_live_holder_is_refused_and_a_free_one_taken_whatever_its_file_says(tmp_path, capsys):
    from vizer.run_dir import locked

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from vizer.run_dir import "
            f"locked; from pathlib import Path\nwith locked(Path({str(out)!r})):\n    print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # the OS lock, not the text, decides
        with (
            pytest.raises(RecipeError, match=rf"^OUT {out} is in use by pid 1 on elsewhere .*another OUT$"),
            locked(out),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    # a run of this runner whose pid now belongs to a live process (here: ours): its OS lock is free, it is gone
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "lock": "flock"}))
    with locked(out):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a run that is gone (pid {os.getppid()})" in capsys.readouterr().out
    assert not (out / ".lock").exists()
