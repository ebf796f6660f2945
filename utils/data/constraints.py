"""A second bundled task family: instruction-following constraints in the style of IFEval.

Why it exists: the arithmetic/string family (utils.data.bundled) has one right answer per prompt,
so an SFT model either knows it or not. Here a prompt asks for a short text about a topic under
one or two verifiable rules ("Answer in exactly 6 words.", "Include the word 'calm'.", "Use
exactly 3 bullet points ...", "Answer in JSON with the keys ..."), so many answers pass and a
small model gets the counting rules right only some of the time: pass@8 sits well above pass@1,
which is what RL can amplify.

`score(prompt, response)` parses the rules back out of the prompt text (never looks anything up)
and returns the fraction of them the response meets, in [0, 1]; a response with no letter or digit
scores 0. Rows are {"prompt", "chosen" (meets every rule), "rejected" (breaks one rule, or ignores
them all), "constraints" (the rules as JSON-able dicts)}, regenerated deterministically from
(num, seed). Chosen answers are built from small word lists so a 135M model can learn the pattern.
"""
from __future__ import annotations

import json
import random
import re
import string
from typing import Callable, Sequence

from utils.data.bundled import question_of

__all__ = ["KINDS", "generate_examples", "score", "score_batch", "score_constraints",
           "parse_constraints", "is_task_prompt", "question_of", "task_of", "plain_text_corpus"]

_TOPICS = tuple("""ocean forest garden river city village mountain desert moon market library
kitchen train dog cat horse owl bicycle piano coffee bread castle island storm beach farm bridge
lake park school""".split())
_ADJS = tuple("calm quiet bright warm cold soft old busy green big small gentle happy lovely "
              "fresh".split())
_TIMES = ("morning", "evening", "night", "spring")
_PLACES = ("hill", "road", "house", "field", "tower", "shop")
_THINGS = ("water", "light", "sand", "trees", "sounds", "colors", "air", "paths", "birds",
           "stones", "days", "walls")
_END_WORDS = ("today", "tonight", "again", "now", "too", "here")
_JSON_VALUES = {"color": ("red", "blue", "green", "white", "gray", "golden"), "place": _PLACES,
                "mood": _ADJS, "size": ("big", "small", "tiny", "huge"), "time": _TIMES,
                "sound": ("soft", "loud", "quiet")}
_OPENERS = ("Write about the {topic}.", "Describe the {topic}.", "Tell me about the {topic}.",
            "Write a few words about the {topic}.")

# kind -> instruction phrasings; fields: n (count), w (word), keys (JSON key list).
_PHRASES = {
    "word_exact": ("Answer in exactly {n} words.", "Use exactly {n} words."),
    "word_max": ("Answer in at most {n} words.", "Use no more than {n} words."),
    "sentences": ("Answer in exactly {n} sentences.", "Write exactly {n} sentences."),
    "bullets": ("Answer with exactly {n} bullet points starting with '- '.",
                "Use exactly {n} bullet points, each on its own line starting with '- '."),
    "json": ("Answer in JSON with the keys {keys}.", "Reply with a JSON object with the keys {keys}."),
    "include": ("Include the word '{w}'.", "Use the word '{w}' somewhere."),
    "exclude": ("Do not use the word '{w}'.", "Never say the word '{w}'."),
    "end": ("End your answer with the word '{w}'.", "The last word must be '{w}'."),
    "upper": ("Write everything in capital letters.", "Answer in uppercase letters only."),
    "quotes": ("Wrap your whole answer in double quotes.",
               "Put your entire answer inside double quotes."),
    "title": ("Give it a title in double angular brackets, like <<title>>.",
              "Add a title wrapped in << and >>."),
}
KINDS: tuple[str, ...] = tuple(_PHRASES)
_SHAPES = ("word_exact", "word_max", "sentences", "bullets", "json")  # at most one per prompt
# Pairs whose rules fight each other (JSON has fixed keys and braces; bullets have no last word).
_CLASH = {frozenset(p) for p in [("json", k) for k in ("end", "upper", "quotes", "title")]
          + [("bullets", "end"), ("bullets", "quotes"), ("word_exact", "title"),
             ("word_max", "title"), ("quotes", "title"), ("include", "exclude")]}
_COUNT_RANGE = {"word_exact": (4, 9), "word_max": (5, 10), "sentences": (2, 3), "bullets": (2, 4)}
_SINGLE_SHARE = 0.4  # prompts with one rule; the rest have two


# ----------------------------------------------------------------------------- checking

_WORD = re.compile(r"[A-Za-z0-9']+")
_TITLE = re.compile(r"<<[^<>\n]*[A-Za-z][^<>\n]*>>")


def _words(text: str) -> list[str]:
    return [w.strip("'").lower() for w in _WORD.findall(text) if w.strip("'")]


def _sentence_count(text: str) -> int:
    body = _TITLE.sub(" ", text).strip().strip('"')
    return sum(1 for part in re.split(r"(?<=[.!?])\s+", body) if re.search(r"[A-Za-z]", part))


def _json_keys(text: str) -> set | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return set(data) if isinstance(data, dict) else None


def _quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"'


_CHECKS: dict[str, Callable[[dict, str], bool]] = {
    "word_exact": lambda c, r: len(_words(r)) == c["n"],
    "word_max": lambda c, r: len(_words(r)) <= c["n"],
    "sentences": lambda c, r: _sentence_count(r) == c["n"],
    "bullets": lambda c, r: sum(line.lstrip().startswith("- ") for line in r.splitlines()) == c["n"],
    "json": lambda c, r: _json_keys(r) == set(c["keys"]),
    "include": lambda c, r: c["word"] in _words(r),
    "exclude": lambda c, r: c["word"] not in _words(r),
    "end": lambda c, r: _words(r)[-1:] == [c["word"]],
    "upper": lambda c, r: r == r.upper() and re.search("[A-Z]", r) is not None,
    "quotes": lambda c, r: _quoted(r),
    "title": lambda c, r: _TITLE.search(r) is not None,
}


def met(constraint: dict, response: str) -> bool:
    """Whether `response` meets one constraint dict ({"kind": ..., params})."""
    r = response.strip()
    return bool(_WORD.search(r)) and _CHECKS[constraint["kind"]](constraint, r)


def score_constraints(constraints, response: str) -> float:
    """Fraction of `constraints` (a list of dicts, or its JSON string) that `response` meets."""
    if isinstance(constraints, str):
        constraints = json.loads(constraints)
    if not constraints:
        raise ValueError("no constraints to check")
    return sum(met(c, response) for c in constraints) / len(constraints)


# ----------------------------------------------------------------------------- prompt text

def _render_keys(keys: Sequence[str]) -> str:
    quoted = [f'"{k}"' for k in keys]
    return ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _instruction(c: dict, phrase: str) -> str:
    return phrase.format(n=c.get("n"), w=c.get("word"), keys=_render_keys(c.get("keys", ["x"])))


_FIELD_RE = {"n": r"(?P<n>\d+)", "w": r"(?P<w>[a-z]+)",
             "keys": r'(?P<keys>"[a-z]+"(?:, "[a-z]+")* and "[a-z]+")', "topic": r"(?P<topic>[a-z]+)"}


def _compile(template: str) -> re.Pattern:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal) + (_FIELD_RE[name] if name else ""))
    return re.compile("".join(parts))


_OPENER_RES = [_compile(t) for t in _OPENERS]
_PHRASE_RES = [(kind, _compile(p)) for kind, phrases in _PHRASES.items() for p in phrases]


def _constraint_from(kind: str, m: re.Match) -> dict:
    g = m.groupdict()
    if "n" in g:
        return {"kind": kind, "n": int(g["n"])}
    if "w" in g:
        return {"kind": kind, "word": g["w"]}
    if "keys" in g:
        return {"kind": kind, "keys": re.findall(r'"([a-z]+)"', g["keys"])}
    return {"kind": kind}


def _parse(prompt: str) -> tuple[str, list[dict]] | None:
    """(topic, constraints) of a constraints prompt (raw or wrapped), or None."""
    text = question_of(prompt)
    opener = next((m for rx in _OPENER_RES if (m := rx.match(text))), None)
    if opener is None:
        return None
    pos, found = opener.end(), []
    while pos < len(text):
        if text[pos] != " ":
            return None
        hit = next(((k, m) for k, rx in _PHRASE_RES if (m := rx.match(text, pos + 1))), None)
        if hit is None:
            return None
        found.append(_constraint_from(*hit))
        pos = hit[1].end()
    return (opener["topic"], found) if found else None


def parse_constraints(prompt: str) -> list[dict]:
    """The constraints stated in a constraints prompt; ValueError for any other prompt."""
    parsed = _parse(prompt)
    if parsed is None:
        raise ValueError(f"not a constraints task prompt: {prompt[:80]!r}")
    return parsed[1]


def is_task_prompt(prompt: str) -> bool:
    """True when `prompt` (raw or wrapped) is one `score` can check."""
    return _parse(prompt) is not None


def task_of(prompt: str) -> str:
    """The prompt's constraint kinds joined by '+', in KINDS order, e.g. "word_exact+include"."""
    kinds = {c["kind"] for c in parse_constraints(prompt)}
    return "+".join(k for k in KINDS if k in kinds)


def score(prompt: str, response: str) -> float:
    """Fraction of the prompt's constraints that `response` meets, in [0, 1].

    Raises ValueError when the prompt is not a constraints task prompt (see `is_task_prompt`).
    """
    return score_constraints(parse_constraints(prompt), response)


def score_batch(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [score(p, r) for p, r in zip(prompts, responses)]


# ----------------------------------------------------------------------------- answers

class _Writer:
    """Builds short answers about one topic; the rules it is told to honor shape the words."""

    def __init__(self, topic: str, rng: random.Random, rules: dict[str, dict]):
        self.topic, self.rng, self.rules = topic, rng, rules
        self.avoid = {rules["exclude"]["word"]} if "exclude" in rules else set()
        self.include = rules.get("include", {}).get("word")

    def adj(self) -> str:
        if self.include in _ADJS and self.rng.random() < 0.7:
            return self.include
        return self.rng.choice([a for a in _ADJS if a not in self.avoid])

    def subject(self, cap: bool) -> str:
        if self.topic in self.avoid:
            return "It" if cap else "it"
        return f"{'The' if cap else 'the'} {self.topic}"

    def sentence(self) -> str:
        r, s, o = self.rng, self.subject(True), self.subject(False)
        return r.choice((
            f"{s} is {self.adj()}.", f"{s} is very {self.adj()}.",
            f"{s} is {self.adj()} and {self.adj()}.", f"{s} looks {self.adj()} in the {r.choice(_TIMES)}.",
            f"We saw {o} near the {r.choice(_PLACES)}.", f"I like {o} because it is {self.adj()}.",
            f"{s} feels {self.adj()} at night.", f"Everyone says {o} is {self.adj()}."))

    def prose(self, count: int) -> str:
        text = " ".join(self.sentence() for _ in range(count))
        end = self.rules.get("end", {}).get("word")
        return f"{text[:-1]} {end}." if end else text

    def bullets(self, count: int) -> str:
        items = [f"- {self.adj()} {self.rng.choice(_THINGS)}" for _ in range(count)]
        return "\n".join(items)

    def json_object(self, keys: list[str]) -> str:
        values = {k: self.topic if k == "name" else self.rng.choice(_JSON_VALUES[k]) for k in keys}
        if self.include and "mood" in values and self.include in _ADJS:
            values["mood"] = self.include
        return json.dumps(values)

    def title(self) -> str:
        if self.topic in self.avoid:
            return self.rng.choice(("A Short Note", "Some Thoughts", "A Quiet Story"))
        return self.rng.choice((f"The {self.topic.title()}", f"My {self.topic.title()}",
                                f"A {self.adj().title()} {self.topic.title()}"))


def _body(w: _Writer, rules: dict[str, dict]) -> str:
    if "json" in rules:
        return w.json_object(rules["json"]["keys"])
    if "bullets" in rules:
        return w.bullets(rules["bullets"]["n"])
    if "sentences" in rules:
        return w.prose(rules["sentences"]["n"])
    if "word_exact" in rules:  # one or two sentences; the caller retries until the count fits
        return w.prose(1 if rules["word_exact"]["n"] <= 7 or w.rng.random() < 0.5 else 2)
    return w.prose(1 if "word_max" in rules or w.rng.random() < 0.6 else 2)


def _write(topic: str, constraints: list[dict], rng: random.Random) -> str:
    rules = {c["kind"]: c for c in constraints}
    w = _Writer(topic, rng, rules)
    text = _body(w, rules)
    if "title" in rules:
        text = f"<<{w.title()}>>\n{text}"
    if "upper" in rules:
        text = text.upper()
    return f'"{text}"' if "quotes" in rules else text


def _answer(topic: str, build: list[dict], want: Callable[[str], bool], rng: random.Random,
            prefix: str = "") -> str | None:
    """An answer written to the rules `build` that `want` accepts (None after 200 tries)."""
    for _ in range(200):
        text = prefix + _write(topic, build, rng)
        if want(text):
            return text
    return None


# ----------------------------------------------------------------------------- rows

def _sample_constraint(kind: str, topic: str, rng: random.Random) -> dict:
    if kind in _COUNT_RANGE:
        return {"kind": kind, "n": rng.randint(*_COUNT_RANGE[kind])}
    if kind == "json":
        keys = rng.sample(sorted(_JSON_VALUES) + ["name"], rng.choice((2, 2, 3)))
        return {"kind": kind, "keys": keys}
    word = {"include": lambda: rng.choice(_ADJS), "exclude": lambda: topic,
            "end": lambda: rng.choice(_END_WORDS)}.get(kind)
    return {"kind": kind, "word": word()} if word else {"kind": kind}


def _compatible(kind: str, chosen: Sequence[str]) -> bool:
    return all(kind != k and frozenset((kind, k)) not in _CLASH
               and not (kind in _SHAPES and k in _SHAPES) for k in chosen)


def _sample_constraints(topic: str, rng: random.Random) -> list[dict]:
    kinds = [rng.choice(KINDS)]
    if rng.random() >= _SINGLE_SHARE:
        kinds.append(rng.choice([k for k in KINDS if _compatible(k, kinds)]))
    kinds.sort(key=KINDS.index)  # shape first, then words, case, wrapping: reads naturally
    out = [_sample_constraint(k, topic, rng) for k in kinds]
    if "json" in kinds:  # "name" holds the topic, "mood" an adjective: keep them consistent
        c = out[kinds.index("json")]
        if "exclude" in kinds and "name" in c["keys"]:
            c["keys"][c["keys"].index("name")] = rng.choice([k for k in _JSON_VALUES
                                                             if k not in c["keys"]])
        if "include" in kinds and "mood" not in c["keys"]:
            c["keys"][-1] = "mood"
    return out


def _broken(c: dict, rng: random.Random) -> dict | None:
    """A rule that, written to, breaks `c` (None: write without it and let the check decide)."""
    if c["kind"] in ("word_exact", "sentences", "bullets"):
        low = _COUNT_RANGE[c["kind"]][0]
        return {**c, "n": c["n"] + (rng.choice((-1, 1)) if c["n"] > low else 1)}
    if c["kind"] == "word_max":
        return {"kind": "word_exact", "n": c["n"] + rng.randint(1, 3)}
    if c["kind"] == "json" and rng.random() < 0.5:
        keys = list(c["keys"])
        keys[-1] = rng.choice([k for k in _JSON_VALUES if k not in keys])
        return {**c, "keys": keys}
    return None


def _rejected(topic: str, constraints: list[dict], rng: random.Random) -> str | None:
    if rng.random() < 0.3:  # ignores the rules: chatty prose that breaks at least one
        return _answer(topic, [], lambda t: score_constraints(constraints, t) < 1, rng, "Sure! ")
    i = rng.randrange(len(constraints))
    build = [c for c in constraints[:i] + [_broken(constraints[i], rng)] + constraints[i + 1:] if c]
    return _answer(topic, build, lambda t: not met(constraints[i], t)
                   and all(met(c, t) for c in build), rng)  # a near miss: n +- 1, one rule off


def _example(rng: random.Random) -> dict | None:
    """One row, or None when the drawn rules admit no answer the writer can build."""
    topic = rng.choice(_TOPICS)
    constraints = _sample_constraints(topic, rng)
    opener = rng.choice(_OPENERS).format(topic=topic)
    rules = " ".join(_instruction(c, rng.choice(_PHRASES[c["kind"]])) for c in constraints)
    chosen = _answer(topic, constraints, lambda t: score_constraints(constraints, t) == 1.0, rng)
    rejected = chosen and (_rejected(topic, constraints, rng)
                           or _answer(topic, [], lambda t: score_constraints(constraints, t) < 1,
                                      rng, "Sure! "))
    if not rejected:
        return None
    return {"prompt": f"{opener} {rules}", "chosen": chosen, "rejected": rejected,
            "constraints": constraints}


def generate_examples(num: int = 6000, seed: int = 0) -> list[dict]:
    """`num` distinct prompts with chosen/rejected answers and their constraints, deterministic."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < num:
        for _ in range(10_000):  # redraw on a duplicate prompt
            ex = _example(rng)
            if ex and ex["prompt"] not in seen:
                break
        else:
            raise ValueError(f"constraints task ran out of distinct prompts at num={num}")
        seen.add(ex["prompt"])
        out.append(ex)
    return out


def plain_text_corpus() -> list[str]:
    """Short deterministic paragraphs in the answers' vocabulary (for a ptx loss)."""
    rng = random.Random(20261205)  # fixed: the corpus does not depend on the data seed
    return [_Writer(t, rng, {}).prose(3) for t in _TOPICS for _ in range(6)]
