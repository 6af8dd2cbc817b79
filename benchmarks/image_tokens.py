"""Image tokens per picture for each image setting, counted from the processors themselves.

    python -m benchmarks.image_tokens [--time] [--device cuda]

Prints a markdown table: image tokens of one 512x512 and one 1024x768 picture under SmolVLM's image
processors (512-px tiles of the 256M/500M models, 384-px tiles of the 2.2B model; one tile, or tiles plus a
global view with image splitting) and Qwen2-VL's (max_pixels 256*28^2 and 1024*28^2). A count is the number of
`input_ids` equal to the image token in the processed prompt, so it includes everything the processor adds.

`--time` adds the seconds per GRPO step of the group-shared path for every cell, each measured by
`python -m benchmarks.grpo_step --side shared --steps 1` in its own process (one warm-up step first): slow,
minutes per cell on a CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass

PICTURES = ((512, 512), (1024, 768))


@dataclass(frozen=True)
class Setting:
    label: str
    model: str  # a benchmarks.real_sized name: its processor counts, its model is timed
    image_splitting: bool = False
    max_pixels: int | None = None

    def processor(self):
        from benchmarks import real_sized

        return real_sized.build_processor(self.model, image_splitting=self.image_splitting, max_pixels=self.max_pixels)

    def grpo_step_flags(self) -> list[str]:
        flags = ["--model", self.model]
        if self.image_splitting:
            flags.append("--image-splitting")
        if self.max_pixels is not None:
            flags += ["--max-pixels", str(self.max_pixels)]
        return flags


SETTINGS = (
    Setting("SmolVLM-256M/500M (512-px tiles), no splitting", "smolvlm256"),
    Setting("SmolVLM-256M/500M (512-px tiles), image splitting", "smolvlm256", image_splitting=True),
    Setting("SmolVLM-2.2B (384-px tiles), no splitting", "smolvlm2b"),
    Setting("SmolVLM-2.2B (384-px tiles), image splitting", "smolvlm2b", image_splitting=True),
    Setting("Qwen2-VL-2B, max_pixels 256·28²", "qwen2vl2b", max_pixels=256 * 28 * 28),
    Setting("Qwen2-VL-2B, max_pixels 1024·28²", "qwen2vl2b", max_pixels=1024 * 28 * 28),
)


def counts(setting: Setting, sizes: tuple[tuple[int, int], ...] = PICTURES) -> list[int]:
    """Image tokens of one picture of each size (width, height) under `setting`."""
    from benchmarks import real_sized
    from benchmarks.grpo_step import picture
    from shapescap.scenes import shapes_scenes

    scene, processor = shapes_scenes("validation", 1)[0], setting.processor()
    return [real_sized.image_tokens(processor, picture(scene, size)) for size in sizes]


def step_seconds(setting: Setting, size: tuple[int, int], device: str) -> float:
    """Seconds per GRPO step of the shared path, from grpo_step's one-side run in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.grpo_step", "--side", "shared", "--steps", "1"]
    command += [*setting.grpo_step_flags(), "--image-size", f"{size[0]}x{size[1]}", "--device", device]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["step_s"]


def table(time_steps: bool = False, device: str = "cpu") -> str:
    """The markdown table; one row per setting, a column per picture (and per picture's s/step)."""
    sizes = [f"{w}×{h}" for w, h in PICTURES]
    header = ["setting", *(f"tokens {s}" for s in sizes)]
    if time_steps:
        header += [f"s/step {s} (shared)" for s in sizes]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for setting in SETTINGS:
        cells = [str(n) for n in counts(setting)]
        if time_steps:
            cells += [f"{step_seconds(setting, size, device):.1f}" for size in PICTURES]
        lines.append("| " + " | ".join([setting.label, *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.image_tokens", description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="also time one shared GRPO step per cell (slow)")
    parser.add_argument("--device", default="cpu", help="device for --time (cpu or cuda)")
    args = parser.parse_args(argv)
    print(table(args.time, args.device), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
