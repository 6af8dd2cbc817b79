"""The phrase splitter on real-style English captions, not only ShapesCap's grammar."""

import pytest

from rewards.phrases import object_phrases, phrase_key

# (caption, the object phrases a reader would list). Articles, plurals, adjectives, relative clauses,
# coordination, spatial relations, numbers, punctuation and non-ASCII letters.
CAPTIONS = [
    ("A dog.", ["dog"]),
    ("a red square", ["red square"]),
    (
        "A large red circle, a small blue square and a green triangle.",
        ["large red circle", "small blue square", "green triangle"],
    ),
    ("Two dogs playing with a red ball next to a wooden bench.", ["two dogs", "red ball", "wooden bench"]),
    ("A man in a blue shirt holding a phone.", ["man", "blue shirt", "phone"]),
    ("A woman who is wearing a hat sits beside her dog.", ["woman", "hat", "dog"]),
    ("A cat sleeping on a couch", ["cat", "couch"]),
    ("3 cats sleeping on a couch", ["3 cats", "couch"]),
    ("Three zebras standing in a grassy field.", ["three zebras", "grassy field"]),
    ("A plate of food with broccoli, carrots and rice.", ["plate", "food", "broccoli", "carrots", "rice"]),
    (
        "A kitchen with white cabinets and a stainless steel refrigerator.",
        ["kitchen", "white cabinets", "stainless steel refrigerator"],
    ),
    ("A building with a clock tower under a cloudy sky.", ["building", "clock tower", "cloudy sky"]),
    ("People walking down the street past parked cars.", ["people", "street", "parked cars"]),
    ("A café terrace with crêpes and coffee.", ["café terrace", "crêpes", "coffee"]),
    ("Ein Hund im Schnee", ["ein hund im schnee"]),  # not English: one piece, nothing lost
    ("A bowl of phở on a wooden table", ["bowl", "phở", "wooden table"]),
    ("A man riding a horse on the beach at sunset.", ["man", "horse", "beach", "sunset"]),
    ("A red double-decker bus driving down a busy street.", ["red double decker bus", "busy street"]),
    ("A group of people standing around a table with laptops.", ["group", "people", "table", "laptops"]),
    ("A bathroom with a toilet, a sink, and a mirror.", ["bathroom", "toilet", "sink", "mirror"]),
    ("A giraffe eating leaves from a tall tree", ["giraffe", "leaves", "tall tree"]),
    ("A little girl holding an umbrella in the rain", ["little girl", "umbrella", "rain"]),
    ("An airplane flying over a city skyline.", ["airplane", "city skyline"]),
    ("A pizza topped with mushrooms and olives on a plate", ["pizza", "mushrooms", "olives", "plate"]),
    ("A boy who is jumping into a swimming pool.", ["boy", "swimming pool"]),
    ("A train that is parked at a station.", ["train", "station"]),
    ("A living room with a fireplace and a flat screen TV.", ["living room", "fireplace", "flat screen tv"]),
    ("Two men and a woman sitting on a bench; a dog lies at their feet.", ["two men", "woman", "bench", "dog", "feet"]),
    ("A close-up of a yellow flower.", ["yellow flower"]),
    ("A black and white photo of an old car", ["black", "white", "old car"]),
    ("A sign that says STOP at an intersection", ["sign", "stop", "intersection"]),
    ("Several sheep grazing near a stone wall.", ["several sheep", "stone wall"]),
    ("A skateboarder performs a trick on a ramp!", ["skateboarder", "trick", "ramp"]),
    ("A laptop, a mouse and a cup of coffee on a desk", ["laptop", "mouse", "cup", "coffee", "desk"]),
    ("A vase of red roses beside a window", ["vase", "red roses", "window"]),
    ("A child with a kite at the park", ["child", "kite", "park"]),
    ("Boats docked in a harbor.", ["boats", "harbor"]),
    ("A bird perched on a branch", ["bird", "branch"]),
    ("A snowy mountain behind a frozen lake", ["snowy mountain", "frozen lake"]),
    ("An elephant and its calf walking through tall grass", ["elephant", "calf", "tall grass"]),
    ("A man wearing glasses reads a newspaper", ["man", "glasses", "newspaper"]),
    ("A bicycle leaning against a brick wall", ["bicycle", "brick wall"]),
    ("A bowl of fruit: apples, bananas, and oranges.", ["bowl", "fruit", "apples", "bananas", "oranges"]),
    ("The Eiffel Tower at night", ["eiffel tower", "night"]),
    ("A woman's hand holding a smartphone", ["woman's hand", "smartphone"]),
    ("A 2-story house with a red roof", ["story house", "red roof"]),
    ("Some food", ["food"]),
    ("There is a cat.", ["cat"]),
    ("This image shows a blue car.", ["blue car"]),
    ("A surfer riding a big wave in the ocean.", ["surfer", "big wave", "ocean"]),
    ("A table set for dinner with candles and wine glasses", ["table set", "dinner", "candles", "wine glasses"]),
    ("Cows in a field next to a barn.", ["cows", "field", "barn"]),
    ("A blue square red square", ["blue square red square"]),  # a run-on stays one piece: the guard counts it
    ("", []),
    ("...", []),
    ("the the a of", []),
]


@pytest.mark.parametrize("caption, expected", CAPTIONS, ids=[c[:40] or "empty" for c, _ in CAPTIONS])
def test_object_phrases_on_real_style_captions(caption, expected):
    assert object_phrases(caption) == expected


def test_enough_varied_captions():
    assert len(CAPTIONS) >= 50
    assert any(not c.isascii() for c, _ in CAPTIONS)


def test_repeats_are_kept_and_keys_fold_plurals():
    assert object_phrases("a red square and a red square") == ["red square", "red square"]
    assert phrase_key("Two Red Squares") == phrase_key("two red square") == "two red square"
    assert phrase_key("boxes") == "box" and phrase_key("berries") == "berry" and phrase_key("bus") == "bus"
    assert phrase_key("glass") == "glass"  # not a plural


def test_look_alike_spellings_fold():
    assert object_phrases("a r\u0435d square") == object_phrases("a red square")  # Cyrillic е
    assert object_phrases("a red-square") == ["red square"]
