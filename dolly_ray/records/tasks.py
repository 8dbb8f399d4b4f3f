"""Project-made instruction tasks with exactly checkable answers.

The demo and the learning tests train on these and score exact match on a held-out
split, so a tiny model's progress is measurable without any downloaded data.
Deterministic: the same seed always gives the same records.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterable

Record = dict[str, str]

# No two of these letters are merged into one token by the tiny tokenizer (``testing.build_tokenizer``
# learns its merges from the wording below), so every task word is one token per letter and
# reversing a word is reversing its tokens.
_LETTERS = "abcdfghj"


def _word(rng: random.Random, low: int = 3, high: int = 5) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(low, high)))


# The fixed wording of each task; the tiny tokenizer learns its merges from these.
WORDING = {
    "reverse_word": "Reverse the letters of the word.",
    "sort_numbers": "Sort the numbers in ascending order.",
    "uppercase": "Convert the word to uppercase.",
    "add_integers": "What is {a} plus {b}?",
    "count_letter": "How many times does the letter {letter} appear in the word {word}?",
    "first_letter": "What is the first letter of the word {word}?",
    "last_letter": "What is the last letter of the word {word}?",
    "repeat_word": "Repeat the word.",
}


def reverse_word(rng: random.Random) -> Record:
    word = _word(rng)
    return {"instruction": WORDING["reverse_word"], "input": word, "output": word[::-1]}


def sort_numbers(rng: random.Random) -> Record:
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 4))]
    return {
        "instruction": WORDING["sort_numbers"],
        "input": " ".join(map(str, numbers)),
        "output": " ".join(map(str, sorted(numbers))),
    }


def uppercase(rng: random.Random) -> Record:
    word = _word(rng)
    return {"instruction": WORDING["uppercase"], "input": word, "output": word.upper()}


def add_integers(rng: random.Random) -> Record:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"instruction": WORDING["add_integers"].format(a=a, b=b), "input": "", "output": str(a + b)}


def count_letter(rng: random.Random) -> Record:
    word = _word(rng, 3, 6)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(_LETTERS)
    return {
        "instruction": WORDING["count_letter"].format(letter=letter, word=word),
        "input": "",
        "output": str(word.count(letter)),
    }


def first_letter(rng: random.Random) -> Record:
    word = _word(rng)
    return {"instruction": WORDING["first_letter"].format(word=word), "input": "", "output": word[0]}


def last_letter(rng: random.Random) -> Record:
    word = _word(rng)
    return {"instruction": WORDING["last_letter"].format(word=word), "input": "", "output": word[-1]}


def repeat_word(rng: random.Random) -> Record:
    word = _word(rng)
    return {"instruction": WORDING["repeat_word"], "input": word, "output": word}


TASKS: dict[str, Callable[[random.Random], Record]] = {
    "reverse_word": reverse_word,
    "sort_numbers": sort_numbers,
    "uppercase": uppercase,
    "add_integers": add_integers,
    "count_letter": count_letter,
    "first_letter": first_letter,
    "last_letter": last_letter,
    "repeat_word": repeat_word,
}


def generate(count: int, seed: int = 0, tasks: Iterable[str] | None = None) -> list[Record]:
    """`count` records cycling through the task kinds, each tagged with its `task` name."""
    names = list(tasks) if tasks is not None else list(TASKS)
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    rng = random.Random(seed)
    records = []
    for i in range(count):
        name = names[i % len(names)]
        records.append({**TASKS[name](rng), "task": name})
    return records


def train_and_heldout(
    num_train: int, num_heldout: int, seed: int = 0, tasks: Iterable[str] | None = None
) -> tuple[list[Record], list[Record]]:
    """A training set and a held-out set with no (instruction, input) pair in common."""
    tasks = list(tasks) if tasks is not None else None
    train = generate(num_train, seed, tasks)
    seen = {(r["instruction"], r["input"]) for r in train}
    heldout: list[Record] = []
    candidate_seed = seed + 1_000_003
    while len(heldout) < num_heldout:
        for record in generate(num_heldout * 2, candidate_seed, tasks):
            if (record["instruction"], record["input"]) not in seen and len(heldout) < num_heldout:
                seen.add((record["instruction"], record["input"]))
                heldout.append(record)
        candidate_seed += 1
    return train, heldout


def write_jsonl(records: Iterable[Record], path: str | Path) -> Path:
    """Alpaca-style JSONL: one {instruction, input, output, task} object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path

