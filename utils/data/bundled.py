"""The embedded ("bundled") data set: short instruction tasks whose answers a program can check.

Why it exists: the toolkit must run offline, and RLHF needs a ground truth. Human preference
data sets only tell you which answer people liked; here every prompt has one verifiable answer,
so `score(prompt, response)` is an exact metric. Step 1 (SFT) learns the chosen answers, Step 2
(reward model) learns to rank chosen over rejected, and Step 3 (PPO) is judged by whether the mean
`score` of the policy's answers goes up.

The tasks are small on purpose (SmolLM2-135M and tiny random models must learn them): arithmetic
on small numbers, comparisons, list max/min/sum/count/sort/reverse, word reverse/case/letters,
repeating a word, yes/no questions. Every prompt ends with a format rule ("Answer with the number
only.", "Answer in uppercase.", "Reply in exactly three words.", ...), so an answer can be right in
content but break the rule. Rejected answers are a mix of wrong content (off by one, unsorted,
wrong letter count, ...) and right content with the rule broken (extra words, wrong case), so a
reward model has to learn both.

`score` parses the prompt text (never looks anything up), re-derives the answer and returns
1.0 (correct, format followed), 0.5 (right content, format broken: the last number / word run of
a wordy answer is taken as its content, as GSM8K graders do) or 0.0 (wrong or unparseable).
Nothing is stored on disk: the data is regenerated deterministically from (num, seed).
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

# Common short English words (no palindromes: reversing must change the word; none of the filler
# words used in wordy answers, so counting a repeated word stays exact).
_WORDS = tuple(w for w in dict.fromkeys("""
apple banana cherry grape lemon mango melon peach pear plum berry orange olive onion carrot
potato tomato pepper garlic bread butter cheese honey sugar salt rice bean corn wheat cookie
candy pasta soup salad water juice milk coffee cat dog horse mouse tiger lion zebra camel rabbit
monkey panda koala otter beaver eagle falcon parrot robin sparrow pigeon goose duck swan shark
whale dolphin salmon trout crab snail spider beetle ant bee wasp moth frog toad snake lizard
turtle table chair lamp clock mirror window door house castle tower bridge road street garden
forest river lake ocean island desert valley canyon mountain hill cloud storm rain snow wind
thunder winter summer autumn spring morning evening night planet star comet moon sun rocket
engine wheel bottle basket pencil paper book guitar piano violin drum flute trumpet music song
dance poem story paint brush canvas camera phone radio ticket wallet pocket jacket shirt boots
glove scarf hat sock button needle thread ribbon candle torch lantern ladder hammer shovel rope
chain anchor sail boat ship train truck bicycle wagon cart plane pilot sailor farmer doctor nurse
teacher baker artist singer writer king queen prince knight dragon wizard giant robot pirate
ghost circle square triangle red blue green yellow purple brown black white silver golden happy
quick quiet brave calm bright clever gentle proud shy tiny huge warm cold fresh sweet sour bitter
silent simple friendly lucky stone rock sand dust leaf tree flower grass seed root branch petal
moss fern pine maple oak cedar willow market school library museum kitchen bedroom village city
country map compass tent blanket pillow towel soap spoon fork knife plate bowl cup kettle oven
fridge sofa carpet curtain fence gate roof wall floor brick marble crystal diamond pearl ruby
emerald copper iron steel cotton wool silk leather feather shell coral reef wave tide harbor
""".split()) if w != w[::-1])

_NUM_ONLY = ("Answer with the number only.", "Reply with just the number.",
             "Give only the number as your answer.")
_YES_NO = ("Answer yes or no.", "Reply with yes or no only.")
_WORD_ONLY = ("Answer with the word only.", "Reply with just the word.")
_LETTER_ONLY = ("Answer with the letter only.", "Reply with just the letter.")
_LIST_ONLY = ("Answer with the numbers separated by commas.",
              "Reply with the list only, comma separated.")
_UPPER = "Answer in uppercase."
_REPEAT_ONLY = ("Answer with the words only.",)
_THREE_WORDS = ("Reply in exactly three words.",
                "Answer with the three words only, separated by spaces.")

# Placeholder name -> the regex that reads it back out of a prompt.
_FIELD_RE = {"a": r"\d+", "b": r"\d+", "n": r"\d+", "nums": r"\d+(?:, \d+)+",
             "w": r"[A-Za-z]+", "w1": r"[a-z]+", "w2": r"[a-z]+", "w3": r"[a-z]+", "c": r"[a-z]"}
_INT_FIELDS = {"a", "b", "n"}


@dataclass(frozen=True)
class _Task:
    name: str
    kind: str  # int | yesno | word | numlist | wordlist | words
    templates: tuple[tuple[str, dict], ...]  # (body with {fields}, fixed params for solve)
    suffixes: tuple[str, ...]
    sample: Callable[[random.Random], dict]
    solve: Callable[[dict, dict], object]
    wrong: Callable[[dict, dict, object], list]  # plausible wrong values (may include the right one)
    case_is_content: bool = False  # uppercase/lowercase tasks: case is the answer, not the format


def _t(*bodies: str, **params) -> tuple[tuple[str, dict], ...]:
    return tuple((b, dict(params)) for b in bodies)


def _nums(rng, lo, hi, kmin, kmax, distinct=False) -> list[int]:
    k = rng.randint(kmin, kmax)
    return rng.sample(range(lo, hi + 1), k) if distinct else [rng.randint(lo, hi) for _ in range(k)]


def _swap_adjacent(seq: list) -> list:
    out = list(seq)
    i = len(out) // 2
    out[i - 1], out[i] = out[i], out[i - 1]
    return out


def _drop_letter(w: str) -> str:
    return w[:len(w) // 2] + w[len(w) // 2 + 1:]


def _sample_word(rng):
    return {"w": rng.choice(_WORDS)}


def _sample_count_letter(rng):
    w = rng.choice(_WORDS)
    absent = [c for c in string.ascii_lowercase if c not in w]
    return {"w": w, "c": rng.choice(absent) if rng.random() < 0.25 else rng.choice(w)}


def _sample_lowercase(rng):
    w = rng.choice(_WORDS)
    return {"w": w.upper() if rng.random() < 0.5 else w.capitalize()}


def _sample_two(rng, hi):
    a, b = rng.sample(range(hi + 1), 2)
    return {"a": a, "b": b}


def _sample_subtract(rng):
    a = rng.randint(0, 99)
    return {"a": a, "b": rng.randint(0, a)}


def _first_last(f, p):
    return f["w"][0] if p["which"] == "first" else f["w"][-1]


def _sort_list(f, p):
    return sorted(f["nums"], reverse=p["desc"])


_TASK_LIST = (
    _Task("add", "int",
          _t("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
             "What is the sum of {a} and {b}?"),
          _NUM_ONLY, lambda r: {"a": r.randint(0, 99), "b": r.randint(0, 99)},
          lambda f, p: f["a"] + f["b"],
          lambda f, p, v: [v + 1, v - 1, v + 10, abs(f["a"] - f["b"])]),
    _Task("subtract", "int",
          _t("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
             "What is the difference between {a} and {b}?"),
          _NUM_ONLY, _sample_subtract, lambda f, p: f["a"] - f["b"],
          lambda f, p, v: [v + 1, v - 1, f["a"] + f["b"], v + 10]),
    _Task("multiply", "int",
          _t("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.",
             "What is the product of {a} and {b}?"),
          _NUM_ONLY, lambda r: {"a": r.randint(0, 20), "b": r.randint(0, 20)},
          lambda f, p: f["a"] * f["b"],
          lambda f, p, v: [v + f["a"], v - f["a"], v + f["b"], f["a"] + f["b"], v + 1]),
    _Task("compare", "int",
          _t("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?", want="max")
          + _t("Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?", want="min"),
          _NUM_ONLY, lambda r: _sample_two(r, 99),
          lambda f, p: (max if p["want"] == "max" else min)(f["a"], f["b"]),
          lambda f, p, v: [f["a"] + f["b"] - v]),
    _Task("list_max", "int",
          _t("What is the largest number in the list {nums}?", "Find the maximum of {nums}.",
             "Which number is the biggest among {nums}?"),
          _NUM_ONLY, lambda r: {"nums": _nums(r, 0, 99, 3, 6, distinct=True)},
          lambda f, p: max(f["nums"]),
          lambda f, p, v: [min(f["nums"]), sorted(f["nums"])[-2], f["nums"][0]]),
    _Task("list_min", "int",
          _t("What is the smallest number in the list {nums}?", "Find the minimum of {nums}.",
             "Which number is the smallest among {nums}?"),
          _NUM_ONLY, lambda r: {"nums": _nums(r, 0, 99, 3, 6, distinct=True)},
          lambda f, p: min(f["nums"]),
          lambda f, p, v: [max(f["nums"]), sorted(f["nums"])[1], f["nums"][0]]),
    _Task("list_sum", "int",
          _t("What is the sum of the numbers {nums}?", "Add up {nums}.",
             "What is the total of {nums}?"),
          _NUM_ONLY, lambda r: {"nums": _nums(r, 0, 20, 2, 4)}, lambda f, p: sum(f["nums"]),
          lambda f, p, v: [v + 1, v - 1, v - f["nums"][-1], v + 10]),
    _Task("list_count", "int",
          _t("How many numbers are in the list {nums}?", "Count the numbers in {nums}.",
             "How many items does the list {nums} have?"),
          _NUM_ONLY, lambda r: {"nums": _nums(r, 0, 99, 2, 9)}, lambda f, p: len(f["nums"]),
          lambda f, p, v: [v + 1, v - 1, max(f["nums"])]),
    _Task("sort_list", "numlist",
          _t("Sort {nums} in ascending order.", "Sort the numbers {nums} from smallest to largest.",
             desc=False)
          + _t("Sort {nums} in descending order.", "Sort the numbers {nums} from largest to smallest.",
               desc=True),
          _LIST_ONLY, lambda r: {"nums": _nums(r, 0, 99, 3, 5, distinct=True)}, _sort_list,
          lambda f, p, v: [f["nums"], v[::-1], _swap_adjacent(v)]),
    _Task("reverse_list", "numlist",
          _t("Reverse the list {nums}.", "Write the numbers {nums} in reverse order.",
             "Reverse the order of {nums}."),
          _LIST_ONLY, lambda r: {"nums": _nums(r, 0, 99, 3, 5, distinct=True)},
          lambda f, p: f["nums"][::-1],
          lambda f, p, v: [f["nums"], sorted(f["nums"]), _swap_adjacent(v)]),
    _Task("reverse_word", "word",
          _t("Reverse the word '{w}'.", "Spell '{w}' backwards.",
             "Write the letters of '{w}' in reverse order."),
          _WORD_ONLY + (_UPPER,), _sample_word, lambda f, p: f["w"][::-1],
          lambda f, p, v: [f["w"], _drop_letter(v), "".join(_swap_adjacent(list(v)))]),
    _Task("uppercase", "word",
          _t("Write '{w}' in uppercase letters.", "Convert the word '{w}' to uppercase.",
             "Write '{w}' in capital letters."),
          _WORD_ONLY, _sample_word, lambda f, p: f["w"].upper(),
          lambda f, p, v: [f["w"], f["w"].capitalize(), _drop_letter(v)], case_is_content=True),
    _Task("lowercase", "word",
          _t("Write '{w}' in lowercase letters.", "Convert the word '{w}' to lowercase.",
             "Write '{w}' in small letters."),
          _WORD_ONLY, _sample_lowercase, lambda f, p: f["w"].lower(),
          lambda f, p, v: [f["w"], v.upper(), v.capitalize(), _drop_letter(v)],
          case_is_content=True),
    _Task("count_letter", "int",
          _t("How many times does the letter '{c}' appear in '{w}'?",
             "Count the letter '{c}' in the word '{w}'.", "How many '{c}' letters are in '{w}'?"),
          _NUM_ONLY, _sample_count_letter, lambda f, p: f["w"].count(f["c"]),
          lambda f, p, v: [v + 1, v - 1 if v else 2, len(f["w"])]),
    _Task("first_last_letter", "word",
          _t("What is the first letter of '{w}'?", "What letter does '{w}' start with?",
             which="first")
          + _t("What is the last letter of '{w}'?", "What letter does '{w}' end with?",
               which="last"),
          _LETTER_ONLY + (_UPPER,), _sample_word, _first_last,
          lambda f, p, v: [f["w"][0], f["w"][-1], f["w"][1], chr((ord(v) - 96) % 26 + 97)]),
    _Task("repeat_word", "wordlist",
          _t("Repeat the word '{w}' {n} times, separated by commas.",
             "Write '{w}' {n} times, separated by commas.",
             "Say '{w}' {n} times with commas between them."),
          _REPEAT_ONLY + (_UPPER,), lambda r: {"w": r.choice(_WORDS), "n": r.randint(2, 5)},
          lambda f, p: [f["w"]] * f["n"],
          lambda f, p, v: [v + v[:1], v[:-1]]),
    _Task("is_even", "yesno",
          _t("Is {n} even?", "Is {n} an even number?", parity=0)
          + _t("Is {n} odd?", "Is {n} an odd number?", parity=1),
          _YES_NO, lambda r: {"n": r.randint(0, 999)},
          lambda f, p: f["n"] % 2 == p["parity"], lambda f, p, v: [not v]),
    _Task("greater_than", "yesno",
          _t("Is {a} greater than {b}?", "Is {a} larger than {b}?", op="gt")
          + _t("Is {a} less than {b}?", "Is {a} smaller than {b}?", op="lt"),
          _YES_NO, lambda r: _sample_two(r, 99),
          lambda f, p: f["a"] > f["b"] if p["op"] == "gt" else f["a"] < f["b"],
          lambda f, p, v: [not v]),
    _Task("sort_words", "words",
          _t("Sort these words alphabetically: {w1}, {w2}, {w3}.",
             "Put {w1}, {w2} and {w3} in alphabetical order.",
             "Arrange the words {w1}, {w2}, {w3} alphabetically."),
          _THREE_WORDS, lambda r: dict(zip(("w1", "w2", "w3"), r.sample(_WORDS, 3))),
          lambda f, p: sorted([f["w1"], f["w2"], f["w3"]]),
          lambda f, p, v: [[f["w1"], f["w2"], f["w3"]], v[::-1], _swap_adjacent(v)]),
)

TASKS: tuple[str, ...] = tuple(t.name for t in _TASK_LIST)
_BY_NAME = {t.name: t for t in _TASK_LIST}


def _compile(template: str) -> re.Pattern:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name:
            parts.append(f"(?P<{name}>{_FIELD_RE[name]})")
    return re.compile("".join(parts))


# suffix -> [(task, body regex, params)]: the suffix narrows the candidates before regex matching.
_PARSERS: dict[str, list[tuple[_Task, re.Pattern, dict]]] = {}
for _task in _TASK_LIST:
    for _suffix in _task.suffixes:
        _PARSERS.setdefault(_suffix, []).extend(
            (_task, _compile(body), params) for body, params in _task.templates)


# ----------------------------------------------------------------------------- rendering

def _render_fields(fields: dict) -> dict:
    return {k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in fields.items()}


def _upper(value):
    return [w.upper() for w in value] if isinstance(value, list) else value.upper()


def _canonical(kind: str, value) -> str:
    if kind == "yesno":
        return "yes" if value else "no"
    if kind in ("numlist", "wordlist"):
        return ", ".join(map(str, value))
    if kind == "words":
        return " ".join(value)
    return str(value)


def _format_broken(kind: str, value, text: str, suffix: str, case_is_content: bool) -> list[str]:
    """Right content, rule broken: wordy answers, wrong case, wrong separators (score 0.5)."""
    if kind == "int":
        return [f"The answer is {text}.", f"Sure! The result is {text}.", f"I think it is {text}",
                f"{text} is the answer."]
    if kind == "yesno":
        return (["Yes, it is.", "Yes, that is true.", "The answer is yes."] if value else
                ["No, it is not.", "No, that is false.", "The answer is no."])
    if kind == "word":
        out = [f"The answer is {text}.", f"Sure! It is {text}.", f"'{text}'"]
        return out + [text.lower()] * 2 if suffix == _UPPER and not case_is_content else out
    if kind == "numlist":
        return [f"[{text}]", " ".join(map(str, value)), f"Here is the list: {text}",
                f"The result is {text}."]
    if kind == "wordlist":
        out = [" ".join(value), f"Sure: {text}", f"Here it is: {text}"]
        return out + [text.lower()] * 2 if suffix == _UPPER else out
    return [f"Sorted: {text}", f"The order is {text}", f"Here they are: {text}"]  # words


def _example(task: _Task, rng: random.Random) -> dict:
    body, params = rng.choice(task.templates)
    suffix = rng.choice(task.suffixes)
    fields = task.sample(rng)
    prompt = f"{body.format(**_render_fields(fields))} {suffix}"
    value = task.solve(fields, params)
    wrong = [w for w in task.wrong(fields, params, value)
             if w != value and not (isinstance(w, int) and w < 0)]
    if suffix == _UPPER:
        value, wrong = _upper(value), [_upper(w) for w in wrong]
    chosen = _canonical(task.kind, value)
    if rng.random() < 0.4 or not wrong:
        rejected = rng.choice(_format_broken(task.kind, value, chosen, suffix, task.case_is_content))
    else:
        rejected = _canonical(task.kind, rng.choice(wrong))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": task.name}


def generate_examples(num: int = 6000, seed: int = 0) -> list[dict]:
    """`num` distinct prompts with chosen/rejected answers, tasks balanced, deterministic."""
    rng = random.Random(seed)
    order = [TASKS[i % len(TASKS)] for i in range(num)]
    rng.shuffle(order)
    seen, out = set(), []
    for name in order:
        for _ in range(10_000):  # redraw on a duplicate prompt; small task spaces run out
            ex = _example(_BY_NAME[name], rng)
            if ex["prompt"] not in seen:
                break
        else:
            raise ValueError(f"bundled task {name!r} ran out of distinct prompts at num={num}")
        seen.add(ex["prompt"])
        out.append(ex)
    return out


# ----------------------------------------------------------------------------- checking

def question_of(prompt: str) -> str:
    """Strip the DeepSpeed-Chat " Human: ... Assistant:" wrapper (last turn) if present."""
    text = prompt
    if "Human:" in text:
        text = text[text.rfind("Human:") + len("Human:"):]
    text = text.strip()
    if text.endswith("Assistant:"):
        text = text[:-len("Assistant:")]
    return " ".join(text.split())


def _parse(prompt: str):
    """(task, params, fields, suffix) for a bundled prompt, or None."""
    text = question_of(prompt)
    for suffix, candidates in _PARSERS.items():
        if not text.endswith(" " + suffix):
            continue
        body = text[:-len(suffix) - 1]
        for task, regex, params in candidates:
            m = regex.fullmatch(body)
            if m:
                return task, params, _convert(m.groupdict()), suffix
    return None


def _convert(groups: dict) -> dict:
    out = {}
    for k, v in groups.items():
        if k in _INT_FIELDS:
            out[k] = int(v)
        elif k == "nums":
            out[k] = [int(x) for x in v.split(", ")]
        else:
            out[k] = v
    return out


def _parse_task_prompt(prompt: str):
    """`_parse`, raising ValueError for a prompt that is not a bundled task prompt."""
    parsed = _parse(prompt)
    if parsed is None:
        raise ValueError(f"not a bundled task prompt: {prompt[:80]!r}")
    return parsed


def task_of(prompt: str) -> str:
    """The task name of a bundled `prompt` (raw or wrapped), e.g. "list_sum"."""
    return _parse_task_prompt(prompt)[0].name


def is_task_prompt(prompt: str) -> bool:
    """True when `prompt` (raw or wrapped) is one `score` can check."""
    return _parse(prompt) is not None


_ALPHA = re.compile(r"[A-Za-z]+")


def _words_equal(got: Sequence[str], want: Sequence[str], exact: bool) -> bool:
    if exact:
        return list(got) == list(want)
    return [g.lower() for g in got] == [w.lower() for w in want]


def _grade(kind: str, value, r: str, exact: bool, content_exact: bool) -> float:
    """1.0 right and well-formed, 0.5 right content in the wrong form, else 0.0."""
    if kind == "int":
        if re.fullmatch(r"-?\d+", r):
            return float(int(r) == value)
        nums = re.findall(r"-?\d+", r)
        return 0.5 if nums and int(nums[-1]) == value else 0.0
    if kind == "yesno":
        if r.lower() in ("yes", "no"):
            return float((r.lower() == "yes") == value)
        said = [t for t in _ALPHA.findall(r.lower()) if t in ("yes", "no")]
        return 0.5 if said and (said[0] == "yes") == value else 0.0
    if kind == "numlist":
        if re.fullmatch(r"-?\d+(?:\s*,\s*-?\d+)*", r):
            return float([int(x) for x in r.split(",")] == value)
        runs = re.findall(r"-?\d+(?:[\s,]+-?\d+)*", r)
        return 0.5 if runs and [int(x) for x in re.findall(r"-?\d+", runs[-1])] == value else 0.0
    tokens = _ALPHA.findall(r)
    if kind == "word":
        if _ALPHA.fullmatch(r) and _words_equal([r], [value], exact):
            return 1.0
        return 0.5 if tokens and _words_equal(tokens[-1:], [value], content_exact) else 0.0
    if kind == "wordlist":
        parts = [p.strip() for p in r.split(",")]
        if all(_ALPHA.fullmatch(p) for p in parts) and _words_equal(parts, value, exact):
            return 1.0
        hits = [t for t in tokens if _words_equal([t], value[:1], content_exact)]
        n = len(value)
        return 0.5 if len(hits) == n and _words_equal(tokens[-n:], value, content_exact) else 0.0
    parts = [p for p in re.split(r"[\s,]+", r) if p]  # words: commas between them are fine
    if all(_ALPHA.fullmatch(p) for p in parts) and _words_equal(parts, value, exact):
        return 1.0
    return 0.5 if _words_equal(tokens[-len(value):], value, content_exact) else 0.0


def score(prompt: str, response: str) -> float:
    """Ground-truth reward in [0, 1] for `response` to a bundled `prompt` (raw or wrapped).

    Raises ValueError when the prompt is not a bundled task prompt (see `is_task_prompt`).
    """
    task, params, fields, suffix = _parse_task_prompt(prompt)
    value = task.solve(fields, params)
    upper = suffix == _UPPER
    if upper:
        value = _upper(value)
    r = response.strip()
    if r.endswith("."):
        r = r[:-1].rstrip()
    exact = upper or task.case_is_content
    return _grade(task.kind, value, r, exact, content_exact=task.case_is_content)


def score_batch(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [score(p, r) for p, r in zip(prompts, responses)]


# ----------------------------------------------------------------------------- plain text

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return f"{_ONES[n // 100]} hundred" + (f" and {_number_words(rest)}" if rest else "")


def _number_paragraph(n: int) -> str:
    parity = "even" if n % 2 == 0 else "odd"
    return (f"The number {n} is {parity}. It comes after {n - 1} and before {n + 1}. "
            f"In words it is written {_number_words(n)}. Doubled it is {2 * n}, and {n} plus "
            f"ten is {n + 10}.")


def _word_paragraph(w: str) -> str:
    return (f"The word {w} has {_number_words(len(w))} letters. It starts with the letter {w[0]} "
            f"and ends with the letter {w[-1]}. Spelled backwards it is {w[::-1]}. In capital "
            f"letters it is written {w.upper()}.")


def _list_paragraph(nums: list[int]) -> str:
    text = ", ".join(map(str, nums))
    return (f"Here is a list of numbers: {text}. It has {_number_words(len(nums))} numbers. The "
            f"largest is {max(nums)} and the smallest is {min(nums)}. Their sum is {sum(nums)}. "
            f"Sorted from smallest to largest they read {', '.join(map(str, sorted(nums)))}.")


_ANIMALS = "cat dog horse rabbit fox owl duck goose mouse turtle".split()
_PLACES = "garden forest river market village library kitchen harbor hill meadow".split()
_TIMES = "morning afternoon evening night".split()
_ADJS = "quiet sunny windy cold warm bright rainy calm".split()
_THINGS = "red ball|old book|small key|blue cup|round stone|green leaf|silver coin".split("|")


def _prose_paragraph(rng: random.Random) -> str:
    a, p1, p2 = rng.choice(_ANIMALS), rng.choice(_PLACES), rng.choice(_PLACES)
    return (f"One {rng.choice(_TIMES)} a {a} walked to the {p1}. It was a {rng.choice(_ADJS)} "
            f"day. Near the {p2} the {a} found a {rng.choice(_THINGS)} and carried it home. "
            f"Later the {a} rested and watched the sky.")


def plain_text_corpus() -> list[str]:
    """A few hundred short deterministic paragraphs (number, word and list facts, prose) for ptx."""
    rng = random.Random(20240601)  # fixed: the corpus does not depend on the data seed
    out = [_number_paragraph(n) for n in rng.sample(range(1, 1000), 120)]
    out += [_word_paragraph(w) for w in rng.sample(_WORDS, 120)]
    out += [_list_paragraph(_nums(rng, 0, 99, 3, 6)) for _ in range(80)]
    out += [_prose_paragraph(rng) for _ in range(80)]
    return out


def tokenizer_training_text() -> Iterator[str]:
    """Text to train a tiny byte-level BPE tokenizer on: wrapped dialogues, corpus, symbols."""
    for ex in generate_examples():
        yield f" Human: {ex['prompt']} Assistant: {ex['chosen']}"
        yield f"\n\nHuman: {ex['prompt']}\n\nAssistant: {ex['rejected']}"
    yield from plain_text_corpus()
    yield " ".join(map(str, range(1000)))
    yield " ".join(string.ascii_lowercase) + " " + " ".join(string.ascii_uppercase)
    yield " ".join(_WORDS) + " " + " ".join(w.upper() for w in _WORDS)
