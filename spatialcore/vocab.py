"""The synthetic spatial vocabulary: objects, colours, sizes, relations and prompt phrasing.

One place defines the words that synthetic scenes, prompts and the tiny models' locally
trained tokenizers share, so a tokenizer built from :func:`tokenizer_corpus` covers every
prompt the generator can write.
"""

from __future__ import annotations

import random

# Object kinds drawn as 2-D shapes.
OBJECTS: tuple[str, ...] = (
    "square", "circle", "triangle", "star", "ring", "cross", "diamond", "hexagon", "crescent", "arrow",
)

# Colour name -> RGB, chosen far apart in RGB so a pixel oracle can separate them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 190),
    "orange": (245, 130, 10),
    "cyan": (20, 200, 210),
    "pink": (245, 120, 190),
}

SIZES: tuple[str, ...] = ("small", "medium", "large")

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light grey": (215, 215, 215),
    "beige": (235, 225, 200),
    "pale blue": (210, 225, 240),
    "dark grey": (70, 70, 75),
}

# Relation name -> phrasings ("{a} ... {b}"). "between" is the three-object relation.
RELATIONS: dict[str, tuple[str, ...]] = {
    "left of": ("{a} is to the left of {b}", "{a} sits left of {b}", "{a} is on the left side of {b}"),
    "right of": ("{a} is to the right of {b}", "{a} sits right of {b}", "{a} is on the right side of {b}"),
    "above": ("{a} is above {b}", "{a} is placed over {b}", "{a} floats above {b}"),
    "below": ("{a} is below {b}", "{a} is placed under {b}", "{a} lies beneath {b}"),
    "in front of": ("{a} is in front of {b}", "{a} partly covers {b}", "{a} stands in front of {b}"),
    "behind": ("{a} is behind {b}", "{a} is partly hidden behind {b}", "{a} stands behind {b}"),
    "next to": ("{a} is next to {b}", "{a} is beside {b}", "{a} is close to {b}"),
    "between": ("{a} is between {b} and {c}", "{a} sits in the middle of {b} and {c}"),
}

OPPOSITE: dict[str, str] = {
    "left of": "right of", "right of": "left of",
    "above": "below", "below": "above",
    "in front of": "behind", "behind": "in front of",
}

CONNECTIVES: tuple[str, ...] = ("and", "while", "; also,", ", and", ". Then", ". Meanwhile")

SYSTEM_PROMPT = "You are a helpful assistant."


def noun_phrase(size: str | None, colour: str, obj: str, article: str = "the") -> str:
    words = [article] + ([size] if size else []) + [colour, obj]
    return " ".join(words)


def tokenizer_corpus(seed: int = 0, n_sentences: int = 3000) -> list[str]:
    """Sentences covering every word and phrasing, for training the tiny BPE tokenizers.

    Deterministic for ``seed``. Besides the spatial prompts it holds the chat words the
    Qwen chat template uses, so templated prompts tokenize into whole words.
    """
    rng = random.Random(seed)
    out = [SYSTEM_PROMPT, "system user assistant", "Does the image match the description?"]
    out += [" ".join(OBJECTS), " ".join(COLOURS), " ".join(SIZES), " ".join(BACKGROUNDS)]
    for phrasings in RELATIONS.values():
        for p in phrasings:
            out.append(p.format(a="the object", b="the thing", c="the other"))
    for _ in range(n_sentences):
        parts = []
        for _ in range(rng.randint(1, 4)):
            rel = rng.choice(list(RELATIONS))
            nps = [noun_phrase(rng.choice((None,) + SIZES), rng.choice(list(COLOURS)), rng.choice(OBJECTS),
                               rng.choice(("the", "a"))) for _ in range(3)]
            parts.append(rng.choice(RELATIONS[rel]).format(a=nps[0], b=nps[1], c=nps[2]))
        text = f" {rng.choice(CONNECTIVES)} ".join(parts)
        bg = rng.choice(list(BACKGROUNDS))
        out.append(f"On a {bg} background, {text}.")
    return out
