"""The eight synthetic task families: their word lists, instance samplers and the two
disjoint template sets of each (pretraining and downstream phrasings), and the vocabulary
they can produce. Rows, splits and files are :mod:`bench.synthetic.tasks`."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

N_CHOICES = 4
# The facts table is part of the "world" the model learns: fixed, whatever the data seed.
FACTS_SEED = 1234

Fields = dict[str, str]
Sampler = Callable[[random.Random], tuple[Fields, list[str], int]]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ORDINALS = ("first", "second", "third", "last")
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "horse", "mouse", "tiger", "sheep", "goat", "eagle"),
    "fruit": ("apple", "pear", "grape", "lemon", "mango", "peach", "plum", "cherry"),
    "color": ("red", "green", "blue", "yellow", "purple", "orange", "black", "white"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "knife", "needle", "axe"),
    "vehicle": ("car", "bus", "truck", "train", "boat", "plane", "bike", "tram"),
    "body": ("hand", "foot", "nose", "ear", "knee", "elbow", "chin", "neck"),
}
_ENTITIES = """zorba kelvin mirat dovak pelun tasko vilna brumo quenta fistra gorlan hemsy jarvo
lutrel morvin nadra oskel pindar ravel sulka torvin umbra varko wendel xalia yorik zenna
abrix celdo drava elmur fenni"""
ENTITIES = tuple(_ENTITIES.split())
CITIES = (
    "ardel",
    "bexin",
    "corvu",
    "dunmar",
    "eskar",
    "folby",
    "garnis",
    "hallow",
    "ivren",
    "jostel",
)
RELATIONS = ("city", "color", "pet")


@dataclass(frozen=True)
class Family:
    """One task family: a sampler of instances and its two disjoint template sets."""

    name: str
    sample: Sampler
    pretrain: tuple[str, ...]
    downstream: tuple[str, ...]


def _choices(rng: random.Random, answer: str, pool: list[str]) -> tuple[list[str], int]:
    """``answer`` plus ``N_CHOICES - 1`` distinct distractors from ``pool``, shuffled."""
    distractors = rng.sample(sorted(set(pool) - {answer}), N_CHOICES - 1)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _mod7(rng: random.Random) -> tuple[Fields, list[str], int]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice(("plus", "times"))
    value = (a + b if op == "plus" else a * b) % 7
    choices, answer = _choices(rng, str(value), [str(i) for i in range(7)])
    return {"a": str(a), "b": str(b), "op": op}, choices, answer


def _extreme(rng: random.Random) -> tuple[Fields, list[str], int]:
    nums = rng.sample(range(100), N_CHOICES)
    which = rng.choice(("largest", "smallest"))
    target = max(nums) if which == "largest" else min(nums)
    choices = [str(n) for n in nums]
    return {"nums": ", ".join(choices), "which": which}, choices, nums.index(target)


def _sequence(rng: random.Random) -> tuple[Fields, list[str], int]:
    step = rng.randint(1, 5)
    if rng.random() < 0.5:  # increasing
        start = rng.randint(0, 60 - 4 * step)
    else:
        start, step = rng.randint(4 * step, 60), -step
    seq = [start + i * step for i in range(4)]
    nxt = start + 4 * step
    pool = {nxt + d for d in (-3, -2, -1, 1, 2, 3, step, 2 * step, -step)} - {nxt}
    pool = [str(v) for v in pool if 0 <= v <= 99]
    choices, answer = _choices(rng, str(nxt), pool)
    return {"seq": ", ".join(map(str, seq))}, choices, answer


def facts_table() -> dict[tuple[str, str], str]:
    """The fixed table of made-up facts: (entity, relation) -> value."""
    rng = random.Random(FACTS_SEED)
    values = {"city": CITIES, "color": CATEGORIES["color"], "pet": CATEGORIES["animal"]}
    return {(e, r): rng.choice(values[r]) for e in ENTITIES for r in RELATIONS}


_FACTS = facts_table()
_FACT_VALUES = {r: sorted({v for (_, rel), v in _FACTS.items() if rel == r}) for r in RELATIONS}


def _facts(rng: random.Random) -> tuple[Fields, list[str], int]:
    entity, rel = rng.choice(ENTITIES), rng.choice(RELATIONS)
    choices, answer = _choices(rng, _FACTS[(entity, rel)], _FACT_VALUES[rel])
    return {"e": entity, "rel": rel}, choices, answer


def _category(rng: random.Random) -> tuple[Fields, list[str], int]:
    cats = rng.sample(sorted(CATEGORIES), N_CHOICES)
    words = [rng.choice(CATEGORIES[c]) for c in cats]
    answer = rng.randrange(N_CHOICES)
    return {"words": ", ".join(words), "cat": cats[answer]}, words, answer


def _kth_letter(rng: random.Random) -> tuple[Fields, list[str], int]:
    word = rng.sample(LETTERS, rng.randint(4, 6))  # distinct letters: one right answer
    k = rng.choice((0, 1, 2, len(word) - 1))
    choices, answer = _choices(rng, word[k], word)
    ordinal = "last" if k == len(word) - 1 else ORDINALS[k]
    fields = {"spelled": " ".join(word), "ord": ordinal, "k": str(k + 1)}
    return fields, choices, answer


def _letter_step(rng: random.Random) -> tuple[Fields, list[str], int]:
    k, direction = rng.randint(1, 3), rng.choice(("after", "before"))
    lo, hi = (0, 25 - k) if direction == "after" else (k, 25)
    x = rng.randint(lo, hi)
    target = x + k if direction == "after" else x - k
    near = [LETTERS[i] for i in range(max(0, target - 3), min(26, target + 4))]
    choices, answer = _choices(rng, LETTERS[target], near)
    return {"x": LETTERS[x], "k": str(k), "dir": direction}, choices, answer


def _count_letter(rng: random.Random) -> tuple[Fields, list[str], int]:
    alphabet = rng.sample(LETTERS, 4)  # few distinct letters, so repeats are common
    word = [rng.choice(alphabet) for _ in range(rng.randint(5, 9))]
    x = rng.choice(alphabet)
    count = word.count(x)
    choices, answer = _choices(rng, str(count), [str(i) for i in range(8)])
    return {"x": x, "spelled": " ".join(word)}, choices, answer


FAMILIES: tuple[Family, ...] = (
    Family(
        "mod7",
        _mod7,
        pretrain=(
            "what is {a} {op} {b} modulo 7?",
            "compute {a} {op} {b} mod 7. the result is",
            "{a} {op} {b} mod 7 equals",
            "find the remainder of {a} {op} {b} after division by 7:",
        ),
        downstream=(
            "in arithmetic modulo 7, {a} {op} {b} gives",
            "reduce {a} {op} {b} modulo seven. you get",
            "take {a} {op} {b} and keep the remainder by 7:",
        ),
    ),
    Family(
        "extreme",
        _extreme,
        pretrain=(
            "which number is the {which}: {nums}?",
            "the {which} of {nums} is",
            "among {nums}, the {which} one is",
            "pick the {which} value from {nums}:",
        ),
        downstream=(
            "from the list {nums}, which is {which}?",
            "{nums}: the {which} number here is",
            "of these numbers {nums}, the {which} is",
        ),
    ),
    Family(
        "sequence",
        _sequence,
        pretrain=(
            "what comes next: {seq},",
            "continue the sequence {seq} with",
            "the next term of {seq} is",
            "the pattern {seq} continues with",
        ),
        downstream=(
            "{seq}, and then?",
            "complete the series {seq}:",
            "after {seq} the next number is",
        ),
    ),
    Family(
        "facts",
        _facts,
        pretrain=(
            "the {rel} of {e} is",
            "{e} has the {rel}",
            "what is the {rel} of {e}?",
            "tell me the {rel} of {e}:",
        ),
        downstream=(
            "which {rel} belongs to {e}?",
            "for {e}, the {rel} is",
            "recall the {rel} of {e}:",
        ),
    ),
    Family(
        "category",
        _category,
        pretrain=(
            "which of {words} is a {cat}?",
            "among {words}, the {cat} is",
            "{words}: the one that is a {cat} is",
            "find the {cat} in {words}:",
        ),
        downstream=(
            "one of {words} is a {cat}. it is",
            "the word among {words} naming a {cat} is",
            "spot the {cat}: {words}. answer:",
        ),
    ),
    Family(
        "kth_letter",
        _kth_letter,
        pretrain=(
            "the {ord} letter of {spelled} is",
            "in {spelled}, letter number {k} is",
            "what is the {ord} letter in {spelled}?",
            "position {k} of {spelled} holds",
        ),
        downstream=(
            "look at {spelled}. its {ord} letter is",
            "spell {spelled}; the {ord} letter is",
            "which letter is {ord} in {spelled}?",
        ),
    ),
    Family(
        "letter_step",
        _letter_step,
        pretrain=(
            "what letter comes {k} {dir} {x}?",
            "in the alphabet, {k} {dir} {x} is",
            "count {k} letters {dir} {x}:",
            "{k} steps {dir} {x} we find",
        ),
        downstream=(
            "starting at {x} and moving {k} {dir}, you reach",
            "which letter is {k} places {dir} {x}?",
            "go {k} {dir} {x} in the alphabet:",
        ),
    ),
    Family(
        "count_letter",
        _count_letter,
        pretrain=(
            "how many times does {x} appear in {spelled}?",
            "count the letter {x} in {spelled}:",
            "in {spelled}, the letter {x} occurs this many times:",
            "the number of {x} in {spelled} is",
        ),
        downstream=(
            "{spelled}. how often is {x} there?",
            "tally {x} within {spelled}:",
            "occurrences of {x} in {spelled} total",
        ),
    ),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


_WORD = re.compile(r"\w+|[^\w\s]+")


def words(text: str) -> list[str]:
    """Split like the tokenizer does (lower-cased, words and punctuation runs)."""
    return _WORD.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word any template, sampler or prompt wrapper can produce, sorted."""
    vocab = set(LETTERS) | {str(i) for i in range(100)} | set(ORDINALS) | set(ENTITIES)
    vocab |= set(CITIES) | set(CATEGORIES) | set(RELATIONS)
    vocab |= {w for ws in CATEGORIES.values() for w in ws}
    vocab |= {"plus", "times", "largest", "smallest", "after", "before", ",", ";"}
    vocab |= {"question", "answer", ":"}  # the usual prompt wrappers
    for family in FAMILIES:
        for template in family.pretrain + family.downstream:
            vocab |= set(words(re.sub(r"\{\w+\}", " ", template)))
    return sorted(vocab)
