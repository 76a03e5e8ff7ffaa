"""Small tasks deltafit generates itself, so the quickstart needs no download and no copied data.

`builtin:<name>` as a recipe's `data.train` (or `data.eval`) loads one of these. Rows are made by a
seeded generator: the same rows on every machine.
"""

from __future__ import annotations

import json
import random

NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
CITIES = ["Paris", "Lagos", "Lima", "Osaka", "Cairo", "Oslo", "Quito", "Seoul", "Dakar", "Porto", "Delhi", "Hanoi"]
JOBS = ["engineer", "teacher", "nurse", "pilot", "chef", "farmer", "lawyer", "painter", "baker", "doctor"]
TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, who works as a {job} in {city}.",
    "{name} ({age}) lives in {city} and is a {job}.",
    "In {city} there is a {job} called {name}, aged {age}.",
]


def person_to_json(n: int, seed: int) -> list[dict]:
    """Turn a sentence about a person into a fixed JSON record (prompt/completion rows).

    Prompts are short on purpose: on 2 CPU cores every token costs, and the quickstart must
    show learning in about a minute of training.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person = {"name": rng.choice(NAMES), "age": rng.randint(18, 80), "job": rng.choice(JOBS),
                  "city": rng.choice(CITIES)}
        sentence = rng.choice(TEMPLATES).format(**person)
        rows.append({"prompt": f"Person: {sentence}\nJSON:", "completion": " " + json.dumps(person)})
    return rows


# name -> (generator, rows, seed). Train and eval use different seeds, so eval rows are unseen sentences.
BUILTIN = {
    "quickstart": (person_to_json, 512, 0),
    "quickstart-eval": (person_to_json, 64, 1),
}


def load_builtin(name: str, key: str = "data.train") -> list[dict]:
    from deltafit.errors import UserError, did_you_mean

    if name not in BUILTIN:
        raise UserError(f"recipe key '{key}': unknown builtin dataset 'builtin:{name}'"
                        f"{did_you_mean(name, BUILTIN)}; valid: "
                        + ", ".join(f"builtin:{n}" for n in BUILTIN))
    make, n, seed = BUILTIN[name]
    return make(n, seed)
