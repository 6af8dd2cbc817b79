"""The words and object phrases of a caption, read as a person reads them. No model, nothing to download.

- `normalise`: NFKC, zero-width characters and word hyphens undone, Latin look-alike letters mapped back.
- `words`: lower-cased words ("red-square" is two).
- `phrases`: runs of content words between function words and punctuation (what the repetition guard counts).
- `object_phrases`: the phrases that name things: `phrases` further cut at verbs ("a man riding a horse" ->
  "man", "horse"), with verb-only pieces dropped. What phrase-level rewards score one by one.
- `phrase_key`: a phrase folded for matching ("Two red squares" and "two red square" are one key).
"""

from __future__ import annotations

import re
import unicodedata

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[^\w\s]")  # words and punctuation marks

# Words that carry no object or attribute: articles, prepositions, conjunctions, pronouns, auxiliaries,
# relative words. Repeating them is grammar, not a repeated object; they separate phrases.
STOPWORDS = frozenset(
    """a an the and or but nor plus of in on at to with without for from by as into onto over under above below
    near next beside besides behind between among across along around against through inside outside front
    back left right top bottom middle center centre side corner upper lower is are was were be been being
    has have had there here this that these those it its they them their he she his her we you i which who
    whose where while when what some any each every other another one also just very then than both all
    it's there's photo picture image shows showing depicts depicting more second third extra additional further
    up down out off past toward towards via upon within during after before like about beneath underneath
    atop amid amidst alongside opposite close far away together its their our my your whom whilst
    appears appear seems seem looks look can could may might will would shall should must do does did
    not no so such too quite rather slightly really""".split()
)

# Verbs that captions use between two things ("a man rides a horse", "a cat sits on a sofa"). A word ending
# in -ing is read as a verb too ("holding", "standing"), except the -ing nouns below.
VERBS = frozenset(
    """sit sits sat stand stands stood lie lies lay lays hold holds held ride rides rode walk walks play plays
    eat eats wear wears wore carry carries carried contain contains feature features display displays fly flies
    run runs jump jumps sleep sleeps wait waits rest rests hang hangs hung lean leans show include includes
    perform performs read reads say says watch watches look looks""".split()
)
# Participles that describe a thing before its noun ("a parked car") but relate two things after it ("a cake
# topped with cherries"): dropped only at the end of a phrase.
PARTICIPLES = frozenset(
    "parked docked perched topped covered filled surrounded made dressed placed located stacked lined painted stuffed".split()
)
ING_NOUNS = frozenset(
    """building buildings ceiling ceilings clothing painting paintings ring rings king kings thing things string
    strings evening morning wing wings swing swings spring springs railing railings awning awnings bedding icing
    pudding wedding dumpling dumplings earring earrings sibling siblings something nothing anything everything
    living stocking stockings frosting topping toppings filling seating lighting parking crossing landing
    dressing stuffing swimming dining washing cutting frying baking""".split()
)

# Spellings that hide a repeat from plain string matching: zero-width characters, hyphens between words,
# letters from other scripts that look Latin ("а" is Cyrillic). NFKC folds full-width and compatibility forms.
_INVISIBLE = {**dict.fromkeys(map(ord, "\u00ad\u200c\u200d\u2060\ufeff"), None), ord("\u200b"): " "}
_HYPHENS = re.compile(r"(?<=[^\W\d_])[-\u2010\u2011\u2012\u2013\u2014\u2212](?=[^\W\d_])")
_LOOKALIKES = str.maketrans(
    "аеорсухіјѕԁԛԝАВЕКМНОРСТХІЈЅαοτνικυΑΒΕΗΙΚΜΝΟΡΤΧΥΖ",
    "aeopcyxijsdqwABEKMHOPCTXIJSaotvikuABEHIKMNOPTXYZ",
)


def normalise(text: str) -> str:
    """The text as a reader sees it: look-alike letters, zero-width characters and word hyphens undone."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE).translate(_LOOKALIKES)
    return _HYPHENS.sub(" ", text)


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(normalise(text))]


def phrases(text: str, stopwords: frozenset[str] = STOPWORDS) -> list[tuple[str, ...]]:
    """Runs of content words between function words and punctuation: "a large red circle next to a
    small square" -> [("large", "red", "circle"), ("small", "square")]."""
    chunks, current = [], []
    for token in (t.lower() for t in TOKEN.findall(normalise(text))):
        if token in stopwords or not token[0].isalnum():
            if current:
                chunks.append(tuple(current))
            current = []
        else:
            current.append(token)
    if current:
        chunks.append(tuple(current))
    return chunks


def _is_verb(word: str) -> bool:
    return word in VERBS or (len(word) >= 5 and word.endswith("ing") and word not in ING_NOUNS)


def object_phrases(text: str) -> list[str]:
    """The phrases of a caption that name things, in order, repeats kept:
    "Two dogs playing with a red ball next to a wooden bench." -> ["two dogs", "red ball", "wooden bench"]."""
    out = []
    for chunk in phrases(text):
        if chunk[-1] in PARTICIPLES:  # "a train that is parked": a relation, not a thing
            chunk = chunk[:-1]
        current: list[str] = []
        for word in (*chunk, ""):  # "" flushes the last piece
            if word and not _is_verb(word):
                current.append(word)
                continue
            if any(w.isalpha() for w in current):  # a bare number or code is not a thing
                out.append(" ".join(current))
            current = []
    return out


def _singular(word: str) -> str:
    if len(word) <= 3 or not word.isalpha() or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


def phrase_key(phrase: str) -> str:
    """A phrase folded for matching: lower case, plural endings dropped ("red squares" -> "red square")."""
    return " ".join(_singular(w) for w in words(phrase))
