"""Warnings when caption health drifts from where the run started, and `monitor.stop_on`.

The baseline is the mean of the first `baseline_steps` logged steps; each later logging step compares the mean
of the last `baseline_steps` logged steps with it (one step's few captions are noisy: a single repeated caption
moves the rate by 1/8 at G=8). Each signal warns once, with one line naming it, the step and the numbers; a
signal listed in `stop_on` also saves a checkpoint at that step and ends training as a normal end would.

Signals (recipe keys in `monitor:`):
- `length`: mean words per caption reach `length_ratio` times the baseline.
- `repetition`: the repeated-phrase rate rises `repeated_margin` above the baseline.
- `canary`: the reward (the mean of the last `baseline_steps` logged steps) is above its baseline while the
  canary set's CLIP-S (`vizer.watch.canary`; the judge's when there is one) fell below its first measurement by
  `canary_drop` and by twice the standard error of the per-image change. The pictures are fixed, but their
  greedy captions change between checkpoints, and the mean of 16 moves by +-0.1 CLIP-S in runs that improve
  (ShapesCap): a fall within that noise is not a signal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from transformers import TrainerCallback

WATCHED = {"length": "health/mean_words", "repetition": "health/repeated"}
REWARD = "reward"  # TRL's logged mean weighted reward
CANARY_KEYS = ("canary/clip_s", "canary/clip_s_judge")
CANARY_SIGMAS = 2.0  # a canary fall counts only beyond this many standard errors of its per-image change


@dataclass
class Alert:
    signal: str
    step: int
    message: str


class HealthWatch:
    """Feeds on logged rows (step + `health/*`), says which signals fired for the first time."""

    def __init__(
        self,
        baseline_steps: int = 5,
        length_ratio: float = 2.0,
        repeated_margin: float = 0.2,
        canary_drop: float = 0.02,
    ) -> None:
        self.window, self.length_ratio, self.repeated_margin = baseline_steps, length_ratio, repeated_margin
        self.canary_drop = canary_drop
        self.rows: list[dict[str, float]] = []
        self.canary: list[tuple[int, float, float]] = []  # (step, canary CLIP-S, its change's standard error)
        self.canary_key: str | None = None  # the judge's score when the first measurement has one
        self.fired: set[str] = set()

    def observe(self, step: int, logs: dict) -> list[Alert]:
        if CANARY_KEYS[0] in logs:
            self.canary_key = self.canary_key or next(k for k in reversed(CANARY_KEYS) if k in logs)
            if logs.get(self.canary_key) is not None:
                se = float(logs.get(self.canary_key + "_se") or 0.0)
                self.canary.append((step, float(logs[self.canary_key]), se))
            return self._canary(step)
        if WATCHED["length"] not in logs:  # not a training logging step of a GRPO run
            return []
        self.rows.append({k: float(logs[k]) for k in (*WATCHED.values(), REWARD) if logs.get(k) is not None})
        if len(self.rows) <= self.window:  # the baseline is still being measured
            return []
        base, now = self._mean(self.rows[: self.window]), self._mean(self.rows[-self.window :])
        alerts = []
        if "length" not in self.fired and base["length"] > 0 and now["length"] >= self.length_ratio * base["length"]:
            alerts.append(
                Alert(
                    "length",
                    step,
                    f"mean words {now['length']:.1f} over the last {self.window} logged steps, "
                    f"{now['length'] / base['length']:.2f}x the first {self.window} ({base['length']:.1f}; "
                    f"warns at {self.length_ratio:g}x)",
                )
            )
        if "repetition" not in self.fired and now["repetition"] >= base["repetition"] + self.repeated_margin:
            alerts.append(
                Alert(
                    "repetition",
                    step,
                    f"repeated-phrase rate {now['repetition']:.2f} over the last {self.window} logged steps, "
                    f"up from {base['repetition']:.2f} in the first {self.window} (warns at +{self.repeated_margin:g})",
                )
            )
        self.fired.update(a.signal for a in alerts)
        return alerts + self._canary(step)

    def _canary(self, step: int) -> list[Alert]:
        """The canary signal, checked when either series moves (a canary step logs before its training row)."""
        if "canary" in self.fired or len(self.canary) < 2 or len(self.rows) <= self.window:
            return []
        rewards = [
            [r[REWARD] for r in rows if REWARD in r] for rows in (self.rows[: self.window], self.rows[-self.window :])
        ]
        if not all(rewards):
            return []
        base, now = (sum(v) / len(v) for v in rewards)
        (first_step, first, _), (_, last, se) = self.canary[0], self.canary[-1]
        margin = max(self.canary_drop, CANARY_SIGMAS * se)
        if not (now > base and last <= first - margin):
            return []
        self.fired.add("canary")
        who = "judge" if self.canary_key == CANARY_KEYS[1] else "scorer"
        return [
            Alert(
                "canary",
                step,
                f"reward {now:.3f} over the last {self.window} logged steps, up from {base:.3f} in the first "
                f"{self.window}, while the canary {who} CLIP-S fell to {last:.3f} from {first:.3f} at step "
                f"{first_step} (warns at -{margin:.3g}: the larger of {self.canary_drop:g} and "
                f"{CANARY_SIGMAS:g} standard errors of the per-image change)",
            )
        ]

    def _mean(self, rows: list[dict[str, float]]) -> dict[str, float]:
        out = {}
        for signal, key in WATCHED.items():
            values = [r[key] for r in rows if key in r]
            out[signal] = sum(values) / len(values) if values else 0.0
        return out


class Monitor(TrainerCallback):
    """Runs a HealthWatch on every logging step; on a `stop_on` signal, saves a checkpoint and stops. Every
    process decides alike (the logged health is computed from captions gathered over all of them)."""

    def __init__(
        self,
        settings: dict,
        history: Iterable[dict] = (),
        say: Callable[[str], None] = print,
    ) -> None:
        self.watch = HealthWatch(
            settings["baseline_steps"], settings["length_ratio"], settings["repeated_margin"], settings["canary_drop"]
        )
        self.stop_on, self.say = set(settings["stop_on"]), say
        self.stopped: Alert | None = None
        for row in history:  # a resumed run keeps the baseline (and the warnings) of its first steps
            self.watch.observe(int(row.get("step", 0)), row)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for alert in self.watch.observe(state.global_step, logs or {}):
            stop = alert.signal in self.stop_on and self.stopped is None
            if state.is_world_process_zero:
                self.say(
                    f"monitor: {alert.signal} at step {alert.step}: {alert.message}"
                    + ("; stopping (monitor.stop_on) after a checkpoint at this step" if stop else "")
                )
            if stop:
                self.stopped = alert
                control.should_save, control.should_training_stop = True, True
