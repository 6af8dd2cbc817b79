"""Reward plugins: each recipe entry becomes a TRL reward callable (see rewards/README.md)."""

from .registry import (
    BUILTINS,
    RewardConfigError,
    build_reward,
    resolve_factory,
    reward_name,
    validate_reward_entry,
)

__all__ = [
    "BUILTINS",
    "RewardConfigError",
    "build_reward",
    "resolve_factory",
    "reward_name",
    "validate_reward_entry",
]
