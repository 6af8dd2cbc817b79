"""vizer: the recipe runner (config, model families, training, evaluation)."""

import logging

# bitsandbytes warns at import on AVX512-BF16 CPUs that an optional hub kernel is missing; its
# PyTorch fallback is what runs, and the warning would be the first line of every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
