"""Small tasks deltafit generates itself, so the quickstart needs no download and no copied data.

`builtin:<name>` as a recipe's `data.train` (or `data.eval`) loads one of these. Rows are made by a
seeded generator (`random.Random(seed)` over fixed lists, nothing hash-ordered): the same rows on
every machine.

The quickstart task turns a sentence about a person into a JSON record. The point is a skill that
transfers to sentences the generator never wrote, so the data is built to make the model *copy*
what it reads rather than recall a short list:

- names, cities and jobs are mostly composed from syllables, everyday words and parts (odd ones
  like "Brevoltu Quennick", "Port Dasrimo", "flurn inspector", "Copperfield", "lantern maker" next
  to real ones), multi-word cities and multi-word jobs included, so no value can be remembered and
  the model learns to re-spell the words it reads (see WORDS);
- many phrasings: fixed templates and sentences assembled from clauses in random order, so the
  fields appear in every order;
- missing fields: a sentence may leave out the age, the job, the city or the name.

The record convention: always the four keys in the order name, age, job, city; `age` is an integer
(the sentence writes it in digits); a field the sentence does not give is `null`. Every other value
is copied verbatim from the sentence (`"job": "night-shift nurse"`, never a paraphrase).
"""

from __future__ import annotations

import json
import random

PROMPT = "Person: {sentence}\nJSON:"

# ---- vocabularies: parts to compose from, plus some real-looking whole values ------------------

ONSETS = ["b", "br", "c", "ch", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "pr",
          "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "y", "z", "zh", ""]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "y", "ae", "oa"]
CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "k", "x", "nd", "rt", "sk", "v", "tz"]
REAL_FIRST = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena",
              "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yusuf",
              "Zoe", "Aiko", "Bjorn", "Carmen", "Dmitri", "Esther", "Fatima", "Gustavo", "Helga", "Ingrid",
              "Jamal", "Keiko", "Luis", "Mei", "Nikolai", "Olga", "Pablo", "Rahul", "Sofia", "Tomasz", "Yara"]
REAL_LAST = ["Smith", "Garcia", "Nguyen", "Okafor", "Kowalski", "Tanaka", "Silva", "Haddad", "Novak", "Larsen",
             "Mendez", "Kim", "Rossi", "Petrov", "Ali", "Fischer", "Dubois", "Mwangi", "O'Brien", "van Dijk"]
REAL_CITIES = ["Paris", "Lagos", "Lima", "Osaka", "Cairo", "Oslo", "Quito", "Seoul", "Dakar", "Porto", "Delhi",
               "Hanoi", "Buenos Aires", "Cape Town", "Kuala Lumpur", "Rio de Janeiro", "Ulaanbaatar", "Reykjavik",
               "Nairobi", "Montreal", "Krakow", "Tbilisi", "Mombasa", "Valparaiso", "Salt Lake City", "Da Nang"]
CITY_SHAPES = ["{X}", "{X}", "{X}", "{X}ville", "{X}burg", "{X}stad", "{X}ton", "Port {X}", "San {X}", "New {X}",
               "{X} City", "{X} Falls", "Lake {X}", "{X} Springs", "Fort {X}", "{X}-on-Sea", "East {X}", "{X} Bay",
               "St. {X}", "{X} Heights", "Upper {X}", "{X} Junction"]
JOBS = ["engineer", "teacher", "nurse", "pilot", "chef", "farmer", "lawyer", "painter", "baker", "doctor",
        "plumber", "electrician", "carpenter", "architect", "dentist", "librarian", "journalist", "firefighter",
        "accountant", "mechanic", "surgeon", "translator", "photographer", "veterinarian", "welder", "tailor",
        "cashier", "courier", "sailor", "florist", "butcher", "barber", "economist", "geologist", "chemist",
        "biologist", "programmer", "designer", "editor", "poet", "dancer", "singer", "actor", "judge",
        "midwife", "optician", "locksmith", "beekeeper", "glassblower", "cartographer", "astronomer",
        "paramedic", "therapist", "sculptor", "jeweler", "potter", "fisherman", "miner", "zookeeper", "curator",
        "analyst", "auditor", "consultant", "receptionist", "bartender", "janitor", "gardener", "surveyor",
        "physicist", "statistician", "animator", "violinist", "drummer", "archivist", "blacksmith", "cobbler"]
JOB_MODIFIERS = ["senior", "junior", "freelance", "retired", "head", "assistant", "chief", "night-shift",
                 "part-time", "trainee", "marine", "software", "wedding", "pastry", "tax", "court", "dairy",
                 "crane", "school", "museum", "forensic", "traveling"]
ODD_JOB_HEADS = ["inspector", "technician", "operator", "repairer", "breeder", "tuner", "polisher", "keeper",
                 "mixer", "grader", "fitter", "sorter"]


# Everyday English words, used whole inside names, cities and jobs ("Stone", "Copperfield", "glass
# polisher"). A sentence holds them as space-led tokens (" Stone") while the JSON string spells them
# without the space ("Stone"), which the model has to learn as a skill: re-spelling a word it reads,
# not just echoing syllables. Common nouns only (no personal names).
WORDS = ("amber apple arrow ash aspen autumn badger barley basket bay beacon bean bear bell berry birch bird "
         "blossom bone book bramble brass bread brick bridge brook broom brush bucket button cable candle canyon "
         "canvas carpet castle cedar chalk cherry cider clay cliff cloud clover coal cobalt coffee comet copper "
         "coral corn cotton crane creek crow crystal daisy dawn deer desert dove dragon drum dune eagle ember "
         "falcon feather fern field finch flint forest fountain fox frost garden garnet ginger glacier glass "
         "glove gold granite grape gravel hammer harvest hawk hazel heather hill holly honey horizon iron ivory "
         "ivy jade juniper kettle lantern lark laurel leaf lemon lily linen maple marble meadow mill mint "
         "mirror moss mountain needle nickel nut oak oat ocean olive onion orchard otter owl paper pearl pebble "
         "pepper pine plum pond poppy quarry quartz rabbit rain raven reed ribbon ridge river robin rope rose "
         "rust saddle sage salt sand scarlet shadow shell silk silver slate snow sparrow spice spring spruce "
         "star steel stone storm straw stream sugar summer swan thistle thorn thunder timber tin tulip velvet "
         "violet walnut water wheat willow wind winter wolf wool wren").split()
WORD_CITY_ENDS = ["field", "ford", "wood", "bridge", "mouth", "brook", "dale", "haven", "gate", "hollow", "moor",
                  "port", "wick", "stead", "cliff", "well"]
WORD_JOB_HEADS = ["maker", "seller", "cutter", "carver", "grower", "trader", "smith", "picker", "merchant",
                  "collector", "painter", "tester", "buyer", "weaver"]


def _word(rng: random.Random, syllables: tuple[int, int]) -> str:
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(*syllables))]
    return "".join(parts) + rng.choice(CODAS)


def _name_part(rng: random.Random, real: list[str]) -> str:
    roll = rng.random()
    if roll < 0.25:
        return rng.choice(real)
    if roll < 0.45:
        return rng.choice(WORDS).capitalize()  # "River", "Stone"
    return _word(rng, (1, 3)).capitalize()


def make_name(rng: random.Random) -> str:
    first = _name_part(rng, REAL_FIRST)
    roll = rng.random()
    if roll < 0.35:
        return first
    last = _name_part(rng, REAL_LAST)
    if roll < 0.42:
        last += "-" + _word(rng, (1, 2)).capitalize()
    elif roll < 0.48:
        first += f" {rng.choice('ABCDEFGHJKLMNPRSTW')}."
    return f"{first} {last}"


def make_city(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.2:
        return rng.choice(REAL_CITIES)
    if roll < 0.4:  # "Copperfield", "Port Willow"
        word = rng.choice(WORDS).capitalize()
        return word + rng.choice(WORD_CITY_ENDS) if rng.random() < 0.5 else rng.choice(CITY_SHAPES).replace("{X}", word)
    city = rng.choice(CITY_SHAPES).replace("{X}", _word(rng, (1, 3)).capitalize())
    if rng.random() < 0.08:
        city += " " + _word(rng, (1, 2)).capitalize()
    return city


def make_job(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(JOBS)
    if roll < 0.75:
        return f"{rng.choice(JOB_MODIFIERS)} {rng.choice(JOBS)}"
    if roll < 0.82:
        return f"{_word(rng, (1, 2))} {rng.choice(ODD_JOB_HEADS)}"
    if roll < 0.94:  # "glass polisher", "lantern maker", "saltmaker"
        word, head = rng.choice(WORDS), rng.choice(ODD_JOB_HEADS + WORD_JOB_HEADS)
        return word + head if head in WORD_JOB_HEADS and rng.random() < 0.3 else f"{word} {head}"
    return f"{rng.choice(JOBS)} and {rng.choice(JOBS)}"


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


# ---- phrasings ---------------------------------------------------------------------------------
# Whole templates, chosen among those naming exactly the fields a person has ({a_job}: "a nurse" /
# "an engineer"). Sentences never start with a job or a city, so values keep their case verbatim.
TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, who works as {a_job} in {city}.",
    "{name} ({age}) lives in {city} and is {a_job}.",
    "In {city} there is {a_job} called {name}, aged {age}.",
    "{name}, {age}, {job}, {city}.",
    "Name: {name}. Age: {age}. Job: {job}. City: {city}.",
    "{name} works in {city} as {a_job}; {name} is {age}.",
    "At {age}, {name} moved to {city} to work as {a_job}.",
    "Our new {job} is {name} ({age}), who comes from {city}.",
    "{name} turned {age} last week. The {job} still lives in {city}.",
    "Born in {city}, {name} is now {age} and works as {a_job}.",
    "I met {name} in {city}: {a_job}, {age} years old.",
    "{name} is {a_job} in {city}.",
    "{name} works as {a_job} and lives in {city}.",
    "From {city}, {name} earns a living as {a_job}.",
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, is from {city}.",
    "{name} is a {age}-year-old {job}.",
    "{name} ({age}) works as {a_job}.",
    "{name} lives in {city}.",
    "{name} is {a_job}.",
    "{name} is {age} years old.",
    "A {age}-year-old {job} from {city} called in.",
    "Someone from {city} who works as {a_job} wrote to us.",
    "An unnamed {job}, {age}, was seen in {city}.",
    "A {job} in {city} asked for help.",
    "The {job} {name} ({age}) lives in {city}.",
    "The {job} {name} comes from {city}.",
    "{name} is {age}. They work as {a_job} in {city}.",
    "{name} is {age}. They live in {city}.",
    "{name}, {a_job} aged {age}, has an office in {city}.",
    "We hired {name} from {city} as our {job}.",
    # sentences that open with the city (kept capitalized, so copying stays verbatim)
    "{city} resident {name}, {age}, works as {a_job}.",
    "{city} is where {name} lives; {name} is {a_job}.",
    "{city}: {name}, {age}, {job}.",
    "{city} has a new {job}: {name}, aged {age}.",
    "{city} native {name} is {age}.",
    "{city}-based {job} {name} is {age} years old.",
    "{name} of {city} is {age}.",
    "{name} of {city} works as {a_job}.",
    "Everyone in {city} knows {name}, the {job}.",
]
# Pronouns for a second sentence about the same person ({name} is 34. She works as ...).
PRONOUNS = [("He", "works", "lives", "is"), ("She", "works", "lives", "is"), ("They", "work", "live", "are")]
SECOND_SENTENCES = {  # a first sentence names the person; a second, with a pronoun, gives the rest
    frozenset({"job", "city"}): ["{P} {work} as {a_job} in {city}.", "{P} {be} {a_job} and {live} in {city}."],
    frozenset({"job"}): ["{P} {work} as {a_job}.", "{P} {be} {a_job}."],
    frozenset({"city"}): ["{P} {live} in {city}.", "{P} {be} from {city}."],
}
# Numbers that are not the age: the model must not take them for one.
NUMBER_ASIDES = [" They have {n} children.", " They moved there in {year}.", " They have done it since {year}.",
                 " They have worked there for {n} years.", " Their office is in room {room}.",
                 " They own {n} bicycles."]
# Sometimes a sentence says more than the record holds: the model must leave it out.
ASIDES = [" They like chess.", " They have two cats.", " They moved there in 2014.", " Nobody knows why.",
          " They play the cello on weekends.", " Their sister is 12.", " They have done it for 9 years.",
          " It was raining.", " They speak three languages."]
SUBJECT_CLAUSES = {  # clause shapes for sentences assembled in random order
    "age": ["is {age}", "is {age} years old", "aged {age}", "turned {age} this year", "age {age}"],
    "job": ["works as {a_job}", "is {a_job}", "has a job as {a_job}", "is employed as {a_job}",
            "trained as {a_job}"],
    "city": ["lives in {city}", "is from {city}", "is based in {city}", "comes from {city}", "resides in {city}",
             "grew up in {city}"],
}
NAMELESS_SUBJECTS = ["Someone", "A person", "One applicant", "A visitor"]


def _fields(template: str) -> frozenset[str]:
    return frozenset(f for f in ("name", "age", "job", "city") if "{" + f + "}" in template
                     or (f == "job" and "{a_job}" in template))


TEMPLATES_BY_FIELDS: dict[frozenset[str], list[str]] = {}
for _t in TEMPLATES:
    TEMPLATES_BY_FIELDS.setdefault(_fields(_t), []).append(_t)


def _assembled(rng: random.Random, person: dict, values: dict) -> str:
    """Subject, then the clauses of the present fields in random order: "X lives in Y, is 34 and ..."."""
    present = [f for f in ("age", "job", "city") if person[f] is not None]
    rng.shuffle(present)
    clauses = [rng.choice(SUBJECT_CLAUSES[f]) for f in present]
    subject = "{name}" if person["name"] is not None else rng.choice(NAMELESS_SUBJECTS)
    if len(clauses) == 1:
        body = clauses[0]
    else:
        body = ", ".join(clauses[:-1]) + rng.choice([" and ", ", and ", ", "]) + clauses[-1]
    return (f"{subject} {body}" + rng.choice([".", ".", ".", "!"])).format(**values)


def _labeled(rng: random.Random, person: dict) -> str:
    """The present fields as labels in random order: "city: Oslo; name: Ana; age: 34"."""
    present = [f for f in ("name", "age", "job", "city") if person[f] is not None]
    rng.shuffle(present)
    labels = {"name": ["name", "Name", "who"], "age": ["age", "Age"], "job": ["job", "Job", "occupation"],
              "city": ["city", "City", "lives in", "home"]}
    return rng.choice(["; ", ", ", " | "]).join(f"{rng.choice(labels[f])}: {person[f]}" for f in present)


def make_person(rng: random.Random) -> dict:
    person = {"name": make_name(rng), "age": rng.randint(18, 95), "job": make_job(rng), "city": make_city(rng)}
    for field, p in (("age", 0.15), ("job", 0.15), ("city", 0.15), ("name", 0.06)):
        if rng.random() < p:
            person[field] = None
    if sum(v is not None for v in person.values()) < 2:  # at least two facts
        person["name"] = make_name(rng)
        person["city"] = person["city"] or make_city(rng)
    return person


def make_sentence(rng: random.Random, person: dict) -> str:
    present = frozenset(f for f, v in person.items() if v is not None)
    templates = TEMPLATES_BY_FIELDS.get(present, [])
    values = {f: v for f, v in person.items() if v is not None}
    if "job" in values:
        values["a_job"] = _a(values["job"])
    roll = rng.random()
    if roll < 0.1:
        return _labeled(rng, person)
    if roll < 0.22 and person["name"] is not None and (person["job"] or person["city"]):
        sentence = _two_sentences(rng, person, values)
    elif not templates or roll < 0.5:
        sentence = _assembled(rng, person, values)
    else:
        sentence = rng.choice(templates).format(**values)
    return _aside(rng, person, sentence)


def _two_sentences(rng: random.Random, person: dict, values: dict) -> str:
    """"Ana Ruiz is 34. She works as a nurse in Oslo.": the second sentence refers back with a pronoun."""
    first = "{name} is {age}." if person["age"] is not None else rng.choice(["Meet {name}.", "This is {name}."])
    pronoun, work, live, be = rng.choice(PRONOUNS)
    rest = frozenset(f for f in ("job", "city") if person[f] is not None)
    second = rng.choice(SECOND_SENTENCES[rest])
    return f"{first} {second}".format(P=pronoun, work=work, live=live, be=be, **values)


def _aside(rng: random.Random, person: dict, sentence: str) -> str:
    """Sometimes a sentence says more than the record holds (a hobby, a number that is not the age)."""
    roll = rng.random()
    if roll < 0.1:
        return sentence + rng.choice(ASIDES)
    if roll < 0.2:
        n, year, room = rng.randint(2, 9), rng.randint(1975, 2024), rng.randint(100, 999)
        aside = rng.choice(NUMBER_ASIDES).format(n=n, year=year, room=room)
        if person["age"] is None or str(person["age"]) not in aside:  # the age stays the only such number
            return sentence + aside
    return sentence


def person_to_json(n: int, seed: int, exclude: frozenset = frozenset()) -> list[dict]:
    """Sentences about people and their JSON records (prompt/completion rows); see the module docstring.

    Prompts are short on purpose: on 2 CPU cores every token costs. Prompts in `exclude` are
    skipped (so eval sentences are never training sentences).
    """
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        person = make_person(rng)
        prompt = PROMPT.format(sentence=make_sentence(rng, person))
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "completion": " " + json.dumps(person)})
    return rows


def person_to_json_eval(n: int, seed: int) -> list[dict]:
    """Like `person_to_json`, minus every sentence of builtin:quickstart."""
    train_make, train_n, train_seed = BUILTIN["quickstart"]
    return person_to_json(n, seed, frozenset(r["prompt"] for r in train_make(train_n, train_seed)))


# name -> (generator, rows, seed). Train and eval use different seeds, so eval rows are unseen sentences.
BUILTIN = {
    "quickstart": (person_to_json, 512, 0),
    "quickstart-eval": (person_to_json_eval, 64, 1),
}


def load_builtin(name: str, key: str = "data.train") -> list[dict]:
    from deltafit.errors import UserError, did_you_mean

    if name not in BUILTIN:
        raise UserError(f"recipe key '{key}': unknown builtin dataset 'builtin:{name}'"
                        f"{did_you_mean(name, BUILTIN)}; valid: "
                        + ", ".join(f"builtin:{n}" for n in BUILTIN))
    make, n, seed = BUILTIN[name]
    return make(n, seed)
