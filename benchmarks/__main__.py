"""`make bench`: the reward benchmarks, then the real-sized GRPO step, stock TRL vs group-shared vision
(about 35 minutes on 2 CPU cores). `--quick` skips the GRPO step; other arguments go to the reward
benchmarks (`python -m benchmarks.bench -h`)."""

import sys

from benchmarks import bench, grpo_step

argv = sys.argv[1:]
quick = "--quick" in argv
status = bench.main([a for a in argv if a != "--quick"])
if status == 0 and not quick:
    # as the shipped recipes train (gradient checkpointing), median of 2; then without it, one sample
    status = grpo_step.main(["--repeats", "2", "--steps", "1"])
if status == 0 and not quick:
    status = grpo_step.main(["--repeats", "1", "--steps", "1", "--no-gradient-checkpointing"])
sys.exit(status)
