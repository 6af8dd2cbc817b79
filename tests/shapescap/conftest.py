import pytest

from shapescap.captioner import build_shapes_captioner

# A weak captioner in about a minute: enough perception for GRPO and ViZer to have something to work with.
SMALL_CAPTIONER = dict(n_scenes=512, vision_steps=200, sft_steps=150, probe_scenes=48, eval_scenes=8)


@pytest.fixture(scope="session")
def small_captioner(tmp_path_factory) -> str:
    return str(build_shapes_captioner(tmp_path_factory.mktemp("parts"), **SMALL_CAPTIONER))
