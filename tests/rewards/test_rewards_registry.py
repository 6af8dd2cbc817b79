"""The recipe-entry contract: validation errors are one line with a hint, names and options reach the plugin."""

import asyncio
import inspect
import sys
import textwrap

import pytest

from rewards import BUILTINS, RewardConfigError, build_reward, reward_name, validate_reward_entry


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"name": "groundng"}, "did you mean 'grounding'"),
        ({"name": "grounding", "modle": "x"}, "unknown option 'modle' (did you mean 'model'?)"),
        ({"name": "grounding", "score": "contrastiv"}, "did you mean 'contrastive'"),
        ({"name": "length", "min_words": "3"}, "option 'min_words' must be int"),
        ({"name": "length", "weight": "high"}, "'weight' must be a finite number"),
        ({"name": "length", "weight": float("nan")}, "'weight' must be a finite number, got nan"),
        ({"name": "length", "id": "two words"}, "'id' must be a name"),
        ({"weight": 1.0}, "missing 'name'"),
        ({"name": "no_such_pkg.mod:factory"}, "cannot import module 'no_such_pkg.mod'"),
        ({"name": "rewards.guards:lenght"}, "did you mean 'length'"),
        # option values each plugin rejects when built, checked without loading its model
        ({"name": "phrase_grounding", "margin": 2}, "option 'margin' must be within [0, 1], got 2"),
        ({"name": "phrase_agreement", "tau": 1.5}, "option 'tau' is a share of the other captions"),
        ({"name": "phrase_agreement", "threshold": -2}, "option 'threshold' is a cosine"),
        ({"name": "length", "min_words": 10, "max_words": 5}, "got min_words 10, max_words 5"),
        ({"name": "length", "min_words": 50}, "got min_words 50, max_words 40"),  # against the default
        ({"name": "repetition", "ngram": 0}, "options need ngram >= 1"),
    ],
)
def test_invalid_entries_fail_with_one_line_naming_the_key(entry, expected):
    with pytest.raises(RewardConfigError) as err:
        validate_reward_entry(entry, 3)
    message = str(err.value)
    assert expected in message
    assert message.startswith("rewards[3]")
    assert "\n" not in message


def test_valid_entries_pass_without_loading_models():
    for entry in (
        {"name": "grounding", "weight": 1.0, "model": "openai/clip-vit-base-patch32", "score": "contrastive"},
        {"name": "consistency", "weight": 0.5, "mode": "centroid"},
        {"name": "length", "weight": 0.2, "min_words": 3, "max_words": 30},
        {"name": "repetition", "weight": 0.5, "extra_stopwords": ["shapes"]},
        {"name": "degenerate", "weight": 1, "id": "degenerate_strict", "penalty": 2},
    ):
        validate_reward_entry(entry, 0)


def test_a_plugin_checks_its_option_values_as_it_would_when_built():
    from rewards.guards import LengthReward
    from rewards.phrase_level import PhraseGroundingReward

    with pytest.raises(ValueError, match="option 'margin' must be within"):  # the reward itself: the same check
        PhraseGroundingReward(object(), margin=2)
    with pytest.raises(ValueError, match="min_words 10, max_words 5"):
        LengthReward(10, 5)


def test_builtin_factories_document_every_option():
    from rewards.registry import resolve_factory

    for name in BUILTINS:
        factory = resolve_factory(name)
        doc = inspect.getdoc(factory) or ""
        for option in inspect.signature(factory).parameters:
            assert f"{option}:" in doc, f"{name}: option {option} undocumented"


def test_name_weight_and_injected_arguments():
    func = build_reward({"name": "degenerate", "weight": 3.0}, prompt="Describe this image.")
    assert func.__name__ == "degenerate"
    assert func.prompt == "Describe this image."  # injected because the factory takes `prompt`
    named = build_reward({"name": "length", "id": "short_length", "weight": 0.1, "max_words": 5})
    assert named.__name__ == "short_length" and named.max_words == 5
    assert reward_name({"name": "pkg.mod:my_reward"}) == "my_reward"
    from trl.trainer.utils import get_callable_name

    assert get_callable_name(named) == "short_length"


def test_custom_plugin_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(
        textwrap.dedent("""
        def shared(completions, **kwargs):
            return [float(len(str(c))) for c in completions]

        def make(scale: float = 1.0):
            return lambda completions, **kwargs: [scale] * len(completions)

        def make_shared():
            return shared

        def make_async():
            async def reward(completions, **kwargs):
                return [2.0] * len(completions)
            return reward
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_plugin", None)
    validate_reward_entry({"name": "my_plugin:make", "scale": 2.0}, 0)
    with pytest.raises(RewardConfigError, match="unknown option 'scal' \\(did you mean 'scale'\\?\\)"):
        validate_reward_entry({"name": "my_plugin:make", "scal": 2.0}, 0)
    func = build_reward({"name": "my_plugin:make", "scale": 2.0, "weight": 9})
    assert func.__name__ == "make" and func(completions=["a", "b"]) == [2.0, 2.0]
    # two entries sharing one module-level function keep their own names
    a = build_reward({"name": "my_plugin:make_shared", "id": "a"})
    b = build_reward({"name": "my_plugin:make_shared", "id": "b"})
    assert (a.__name__, b.__name__) == ("a", "b")
    import my_plugin

    assert my_plugin.shared.__name__ == "shared"
    # an async reward stays async, so TRL awaits it
    from trl.trainer.utils import is_async_callable

    asy = build_reward({"name": "my_plugin:make_async"})
    assert is_async_callable(asy) and asyncio.run(asy(completions=["x"])) == [2.0]
