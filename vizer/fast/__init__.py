"""The exact fast paths of a GRPO step: preprocess each picture once, encode it once, read each group's prompt
once, prefill it once, generate with the adapter merged. Every one equals the stock TRL path within a stated
tolerance, a test proves it, and start-up says whether it runs and, when not, why. Imports nothing else of vizer."""
