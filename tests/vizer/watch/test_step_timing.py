"""Each logging step says where its time went: five `timing/*` keys that add up to the step's wall time."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import read_metrics, tiny_overrides

from vizer.config import load_recipe
from vizer.train import train
from vizer.watch.step_timing import KEYS, PHASES, PhaseClock


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_nested_phases_charge_each_second_once():
    now = FakeTime()
    clock = PhaseClock(now=now)
    with clock.phase("forward_backward"):
        now.t += 1.0
        with clock.phase("other"):  # generate-and-score inside the training step
            now.t += 0.5
            with clock.phase("generation"):
                now.t += 2.0
                with clock.phase("preprocess"):  # the image processor inside generation's prompt step
                    now.t += 0.25
            with clock.phase("reward"):
                now.t += 0.75
        now.t += 3.0  # the backward
    now.t += 0.5  # optimizer step
    assert clock.take() == {
        "timing/preprocess": 0.25,
        "timing/generation": 2.0,
        "timing/reward": 0.75,
        "timing/forward_backward": 4.0,
        "timing/other": 1.0,
    }
    now.t += 2.0
    assert clock.take()["timing/other"] == 2.0, "each take starts a new interval"


def test_make_train_logs_where_the_time_goes(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # an earlier run in this process set it
    recipe = load_recipe("tiny-shapes", [*tiny_overrides("tiny-shapes"), "grpo.max_steps=3"])
    train(recipe, tmp_path)
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert len(steps) == 3
    for row in steps:
        assert all(row[k] >= 0 for k in KEYS), row
        for phase in ("preprocess", "generation", "reward", "forward_backward"):
            assert row[f"timing/{phase}"] > 0, phase
        # TRL's own step_time (its training_step, generation included) is measured apart from ours: the four
        # phases all run inside it, so they cannot add up to more (a second counted twice would); the five add
        # up to it plus what lies outside it (optimizer step, data loading, logging, and any pause the machine's
        # load puts there, which is why the total has no upper bound here)
        phases = sum(row[f"timing/{p}"] for p in PHASES)
        total = sum(row[k] for k in KEYS)
        assert phases <= 1.01 * row["step_time"] + 0.005 and row["step_time"] <= total, (phases, total, row)
    (events,) = (tmp_path / "tensorboard").rglob("events.out.tfevents.*")
    logged = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {f"train/{k}" for k in KEYS} <= set(logged), "TensorBoard gets them through the trainer's logging"
