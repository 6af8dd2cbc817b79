"""Guards: cheap text rules that keep GRPO from gaming the model-based rewards.

Each returns 0.0 for a clean caption and a negative penalty otherwise.
- length: a soft penalty outside a window of words.
- repetition: the share of repeated word trigrams (TRL's repetition penalty, on words) plus a fixed penalty
  per repeated content phrase. Both hacks seen against a CLIP reward repeat a phrase: "a red square and a
  red square" (a repeated object) and "a red square red square" (a run-on, which no trigram repeats).
- degenerate: no letters, an echo of the prompt, or chat-template leftovers.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import Any

from trl.rewards import get_repetition_penalty_reward

from .common import Reward, prompt_text
from .phrases import STOPWORDS, phrases, words
from .registry import checks_options

TEMPLATE_LEFTOVERS = re.compile(
    r"<\|[^|<>]{1,40}\|>"  # <|im_end|>, <|endoftext|>, <|eot_id|>, <|vision_start|> ...
    r"|</?s>|<(?:end_of_utterance|fake_token_around_image|global-img|image|img|row_\d+_col_\d+|unk|pad|eos|bos)>"
    r"|<(?:start|end)_of_turn>|\[/?INST\]|<<SYS>>"
    r"|(?:^|\n)\s*(?:user|assistant|system|human|gpt)\s*:",
    re.IGNORECASE,
)


def _runs_on(part: tuple[str, ...], whole: tuple[str, ...]) -> bool:
    """`whole` is another phrase run on into `part` ("red square purple circle" holds "purple circle"): part
    occurs inside it next to at least two other words, so a single modifier ("small red circle") is fine."""
    n = len(part)
    if n < 2 or len(whole) < n + 2:
        return False
    return any(whole[i : i + n] == part and (i >= 2 or len(whole) - i - n >= 2) for i in range(len(whole) - n + 1))


def repeated_phrases(text: str, stopwords: frozenset[str] = STOPWORDS) -> int:
    """How often a content phrase comes again.

    Counted: the same phrase of two or more words again anywhere ("a red square and a red square"); a word
    again inside one phrase, i.e. a run-on ("a red square red square", "a yellow triangle red triangle");
    a phrase run on into another ("a purple circle and a red square purple circle"); a one-word phrase
    right after itself ("a square and a square"); a doubled function word ("the the").
    Not counted: words shared by different phrases ("a large red circle and a small red circle").
    """
    chunks = phrases(text, stopwords)
    repeats = sum(n - 1 for c in chunks for n in Counter(c).values())
    repeats += sum(n - 1 for c, n in Counter(c for c in chunks if len(c) > 1).items())
    repeats += sum(a == b and len(a) == 1 for a, b in zip(chunks, chunks[1:]))
    repeats += sum(_runs_on(a, b) for a in set(chunks) for b in set(chunks))
    tokens = words(text)
    repeats += sum(a == b and a in stopwords for a, b in zip(tokens, tokens[1:]))
    return repeats


def check_length(min_words: int = 4, max_words: int = 40, **_: Any) -> None:
    if not 0 < min_words <= max_words:
        raise ValueError(f"options need 0 < min_words <= max_words, got min_words {min_words}, max_words {max_words}")


def check_repetition(ngram: int = 3, phrase_penalty: float = 1.0, max_penalty: float = 3.0, **_: Any) -> None:
    if ngram < 1 or phrase_penalty < 0 or max_penalty <= 0:
        raise ValueError(
            f"options need ngram >= 1, phrase_penalty >= 0 and max_penalty > 0, got ngram {ngram}, "
            f"phrase_penalty {phrase_penalty}, max_penalty {max_penalty}"
        )


class LengthReward(Reward):
    __name__ = "length"
    floor = -1.0

    def __init__(self, min_words: int = 4, max_words: int = 40) -> None:
        check_length(min_words, max_words)
        self.min_words, self.max_words = min_words, max_words

    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        out = []
        for text in texts:
            n = len(words(text)) if text is not None else 0
            if n < self.min_words:
                out.append(-(self.min_words - n) / self.min_words)
            elif n > self.max_words:
                out.append(-min(1.0, (n - self.max_words) / self.max_words))
            else:
                out.append(0.0)
        return out


class RepetitionReward(Reward):
    __name__ = "repetition"
    floor = -1.0

    def __init__(
        self,
        ngram: int = 3,
        phrase_penalty: float = 1.0,
        stopwords: frozenset[str] = STOPWORDS,
        max_penalty: float = 3.0,
    ) -> None:
        check_repetition(ngram, phrase_penalty, max_penalty)
        self.ngram_penalty = get_repetition_penalty_reward(ngram_size=ngram, max_penalty=-1.0)
        self.phrase_penalty, self.stopwords = float(phrase_penalty), stopwords
        # Bounded like every other plugin: one degenerate sample ("a red square" x 20) must not stretch its
        # group's reward spread so far that the other samples' advantages all look alike. Empty text gets
        # the worst value too, so it never out-scores a repetitive caption.
        self.floor = -float(max_penalty)

    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        tokens = [words(t) if t is not None else [] for t in texts]
        vocab: dict[str, int] = {}
        ids = [[vocab.setdefault(w, len(vocab)) for w in ts] for ts in tokens]
        ngram = self.ngram_penalty(completion_ids=ids)  # -(1 - distinct/total word n-grams)
        return [
            max(self.floor, g - self.phrase_penalty * repeated_phrases(t, self.stopwords))
            if t is not None
            else self.floor
            for g, t in zip(ngram, texts)
        ]


class DegenerateReward(Reward):
    __name__ = "degenerate"
    floor = -1.0

    def __init__(
        self, prompt: str = "", echo_threshold: float = 0.8, min_letter_ratio: float = 0.5, penalty: float = 1.0
    ) -> None:
        self.prompt, self.echo_threshold = prompt, echo_threshold
        self.min_letter_ratio, self.penalty = min_letter_ratio, float(penalty)
        self.floor = -self.penalty

    def reasons(self, text: str, prompt: str) -> list[str]:
        found = []
        chars = [c for c in text if not c.isspace()]
        letters = sum(c.isalpha() for c in chars)
        if letters == 0 or letters / len(chars) < self.min_letter_ratio:
            found.append("no_letters")
        if TEMPLATE_LEFTOVERS.search(text):
            found.append("template")
        p, t = " ".join(words(prompt)), " ".join(words(text))
        if p and t and (p in t or difflib.SequenceMatcher(None, p, t).ratio() >= self.echo_threshold):
            found.append("echo")
        return found

    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        prompts = kwargs.get("prompts") or [None] * len(texts)
        counts: Counter[str] = Counter()
        out = []
        for text, prompt in zip(texts, prompts):
            if text is None:
                out.append(self.floor)
                continue
            found = self.reasons(text, prompt_text(prompt) if prompt is not None else self.prompt)
            counts.update(found)
            out.append(-self.penalty if found else 0.0)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            for reason in ("no_letters", "template", "echo"):
                log_metric(f"rewards/{self.__name__}/{reason}", counts[reason] / len(texts))
        return out


@checks_options(check_length)
def length(min_words: int = 4, max_words: int = 40) -> LengthReward:
    """0 inside the window; outside, minus the relative distance to it: -(min_words - n) / min_words below,
    -(n - max_words) / max_words above (at most -1).

    Args:
        min_words: shortest caption without penalty, in words.
        max_words: longest caption without penalty, in words.
    """
    return LengthReward(min_words, max_words)


@checks_options(check_repetition)
def repetition(
    ngram: int = 3, phrase_penalty: float = 1.0, extra_stopwords: list[str] | None = None, max_penalty: float = 3.0
) -> RepetitionReward:
    """-(1 - distinct/total word n-grams) - phrase_penalty * (number of repeated content phrases), at least
    -max_penalty.

    Args:
        ngram: n-gram size of the distinct-n-gram term.
        phrase_penalty: penalty per repeated content phrase (a repeated object, a run-on, a doubled word).
        extra_stopwords: words that never make a content phrase (beside articles, prepositions, ...).
        max_penalty: the bound (and the value of an empty caption).
    """
    stopwords = STOPWORDS | frozenset(w.lower() for w in extra_stopwords or ())
    return RepetitionReward(ngram, phrase_penalty, stopwords, max_penalty)


def degenerate(
    prompt: str = "", echo_threshold: float = 0.8, min_letter_ratio: float = 0.5, penalty: float = 1.0
) -> DegenerateReward:
    """-penalty for a caption with (almost) no letters, an echo of the prompt, or chat-template leftovers.

    Args:
        prompt: the prompt text, used when the call does not pass prompts (the runner fills it in).
        echo_threshold: similarity to the prompt (difflib ratio) from which a caption counts as an echo.
        min_letter_ratio: fewest letters among the non-space characters.
        penalty: the penalty.
    """
    return DegenerateReward(prompt, echo_threshold, min_letter_ratio, penalty)
