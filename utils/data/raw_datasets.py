"""The raw-dataset abstraction and the adapters for the hub data sets DeepSpeed-Chat accepts.

Every source (hub name, local file, the bundled task) ends up as a `RawDataset`: two lists of
normalized samples {"prompt", "chosen", "rejected"} in DeepSpeed-Chat's text format
(" Human: {question} Assistant:" prompts, answers starting with a space, rejected None for
SFT-only rows, chosen None too for prompt-only rows, which only Step 3 uses). Each hub adapter
maps that data set's real column schema onto it.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable

import datasets
import numpy as np

from utils.config import ConfigError

EVAL_SHARE = 0.1  # held out (seeded) when a source has no eval split


def human_prompt(question: str) -> str:
    return f" Human: {question.strip()} Assistant:"


def as_answer(text: str) -> str:
    """Answers follow the prompt's "Assistant:" after one space."""
    return text if text[:1].isspace() else " " + text


def as_prompt(text: str) -> str:
    """Keep prompts already in the Human/Assistant format, wrap the rest."""
    stripped = text.rstrip()
    if "Human:" in stripped and stripped.endswith("Assistant:"):
        return stripped
    return human_prompt(text)


def make_sample(prompt: str, chosen: str, rejected: str | None = None) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def holdout(rows: list, seed: int, share: float = EVAL_SHARE) -> tuple[list, list]:
    """Seeded train/eval split of a source that has no eval split (order kept inside each)."""
    n = len(rows)
    n_eval = max(1, round(n * share)) if n >= 2 else 0
    perm = np.random.RandomState(seed).permutation(n)
    eval_idx = set(perm[:n_eval].tolist())
    return ([r for i, r in enumerate(rows) if i not in eval_idx],
            [r for i, r in enumerate(rows) if i in eval_idx])


def subsample(rows: list, n: int, seed: int) -> list:
    """A seeded subset of n rows in their original order (all rows when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(rows):
        return rows
    keep = np.sort(np.random.RandomState(seed).permutation(len(rows))[:n])
    return [rows[i] for i in keep]


class RawDataset:
    """Normalized train and eval splits of one source, with DeepSpeed-Chat's accessors.

    A sample is {"prompt", "chosen" (None: prompt-only), "rejected" (None: SFT-only), "origin"
    (which row it was), "columns" (the row's other columns, JSON values, carried to Step 3)}, and
    for a conversational row "prompt_messages" ([{role, content}, ...] before the answer), which
    the pipeline renders with the tokenizer's chat template (utils/data/render.py).
    """

    def __init__(self, name: str, train: list[dict], eval: list[dict], fingerprint: str = ""):
        self.name = name
        self.train = train
        self.eval = eval
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        return f"RawDataset({self.name!r}, train={len(self.train)}, eval={len(self.eval)})"

    def get_train_data(self) -> list[dict]:
        return self.train

    def get_eval_data(self) -> list[dict]:
        return self.eval

    @property
    def has_rejected(self) -> bool:
        return any(s["rejected"] is not None for s in self.train + self.eval)

    def get_prompt(self, sample: dict) -> str:
        return sample["prompt"]

    def get_chosen(self, sample: dict) -> str:
        return sample["chosen"]

    def get_rejected(self, sample: dict) -> str | None:
        return sample["rejected"]

    def get_prompt_and_chosen(self, sample: dict) -> str | None:
        chosen = sample["chosen"]
        return None if chosen is None else sample["prompt"] + chosen

    def get_prompt_and_rejected(self, sample: dict) -> str | None:
        rejected = sample["rejected"]
        return None if rejected is None else sample["prompt"] + rejected

    def capped(self, num_examples: int, seed: int) -> "RawDataset":
        """At most num_examples train rows and a tenth of that for eval (seeded subsets)."""
        if num_examples <= 0:
            return self
        n_eval = max(1, round(num_examples * EVAL_SHARE))
        return RawDataset(self.name, subsample(self.train, num_examples, seed),
                          subsample(self.eval, n_eval, seed), self.fingerprint)


# ---- per-data-set row converters: real column schema -> sample (None drops the row) ----------

def _keep_format(row):
    """Dahoas/rm-static, Dahoas/full-hh-rlhf: already "\\n\\nHuman: ...\\n\\nAssistant:"."""
    return make_sample(row["prompt"], row["chosen"], row["rejected"])


def _pairwise(row):
    return make_sample(human_prompt(row["prompt"]), as_answer(row["chosen"]),
                       as_answer(row["rejected"]))


def _after_assistant(text: str) -> str:
    """yitingxie answers read "Assistant: ..."; drop that leading marker."""
    text = text.lstrip()
    if text.startswith("Assistant:"):
        text = text[len("Assistant:"):]
    return as_answer(text)


def _yitingxie(row):
    prompt = row["prompt"]  # the last Human turn, lacking the "Assistant:" marker
    prompt += "Assistant:" if prompt[-1:].isspace() else " Assistant:"
    return make_sample(prompt, _after_assistant(row["chosen"]), _after_assistant(row["rejected"]))


_CITATION = re.compile(r"\s*\[\d+(?:\s*[,\-\u2013]\s*\d+)*\]")


def strip_citations(text: str) -> str:
    """WebGPT answers cite their quotes as [1], [2, 3]; the model should not learn those."""
    return _CITATION.sub("", text).strip()


def _webgpt(row):
    if row["score_0"] == row["score_1"]:
        return None  # a tie says nothing about which answer is better
    better, worse = (0, 1) if row["score_0"] > row["score_1"] else (1, 0)
    chosen, rejected = (strip_citations(row[f"answer_{i}"]) for i in (better, worse))
    if not chosen or not rejected:
        return None
    return make_sample(human_prompt(row["question"]["full_text"]), " " + chosen, " " + rejected)


def _shp(row):
    a, b = row["human_ref_A"], row["human_ref_B"]
    chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
    return make_sample(human_prompt(row["history"]), as_answer(chosen), as_answer(rejected))


def _sharegpt(row):
    prompt = (row["prompt"] or "").strip()
    if not prompt or not row["label"]:
        return None
    prompt = prompt.replace("USER:", "Human:").replace("ASSISTANT:", "Assistant:")
    return make_sample(" " + prompt, as_answer(row["label"]))


def _zhihu(row):
    return make_sample(human_prompt(row["INSTRUCTION"]), as_answer(row["RESPONSE"]))


def _miracl(row):
    if not row["positive_passages"]:
        return None
    negatives = row["negative_passages"]
    return make_sample(human_prompt(row["query"]), as_answer(row["positive_passages"][0]["text"]),
                       as_answer(negatives[0]["text"]) if negatives else None)


def _hc3(row):
    answers = [a for a in row["human_answers"] if a and a.strip()]
    return make_sample(human_prompt(row["question"]), as_answer(answers[0])) if answers else None


def _mkqa(lang: str):
    def convert(row):
        answers = row["answers"].get(lang) or []
        text = answers[0]["text"] if answers else None
        query = row["queries"].get(lang)
        if not text or not query:  # unanswerable questions carry no answer text
            return None
        return make_sample(human_prompt(query), as_answer(text))
    return convert


def _qg_jaquad(row):
    return make_sample(human_prompt(row["question"]), as_answer(row["sentence"]))


def _qag_jaquad(row):
    if not row["questions"]:
        return None
    return make_sample(human_prompt(row["questions"][0]), as_answer(row["paragraph"]))


@dataclass(frozen=True)
class HubAdapter:
    """How DeepSpeed-Chat's name for a hub data set is loaded and mapped onto samples."""
    name: str
    convert: Callable[[dict], dict | None]
    path: str = ""  # load_dataset path when it differs from the name
    config: str | None = None
    eval_split: str | None = None  # None: hold out a seeded share of train

    def load_hub(self) -> datasets.DatasetDict:
        return load_hub_dataset(self.path or self.name, self.config)

    def to_raw(self, dsd, seed: int) -> RawDataset:
        if "train" not in dsd:
            raise ConfigError(f"{self.name}: no 'train' split (has {sorted(dsd)})")
        train = convert_rows(self.name, dsd["train"], self.convert)
        if self.eval_split is None:
            train, eval_ = holdout(train, seed)
        elif self.eval_split in dsd:
            eval_ = convert_rows(self.name, dsd[self.eval_split], self.convert,
                                 self.eval_split)
        else:
            raise ConfigError(f"{self.name}: no {self.eval_split!r} split (has {sorted(dsd)})")
        if not train:
            raise ConfigError(f"{self.name}: the data set has no usable rows")
        return RawDataset(self.name, train, eval_, hub_fingerprint(self.name, dsd))


def with_origin(samples, where: str) -> list[dict]:
    """Drop None rows; tag the rest with where they came from, so errors can point at them, and
    give each the row columns it lacks ({}: a source that set "columns" keeps its own)."""
    return [{"columns": {}, **s, "origin": f"{where}row {i}"} for i, s in enumerate(samples) if s is not None]


def convert_rows(name: str, rows, convert, split: str = "train") -> list[dict]:
    try:
        return with_origin(map(convert, rows.to_list()), f"{split} split ")
    except (KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{name}: rows do not have the expected columns "
                          f"({type(e).__name__}: {e}); has {rows.column_names}") from e


def load_hub_dataset(path: str, config: str | None = None):
    """datasets.load_dataset, with its many failure types turned into one ConfigError line."""
    try:
        return datasets.load_dataset(path, config)
    except Exception as e:  # noqa: BLE001 - hub/network/format errors all mean "cannot load"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"could not load data set {path!r} with datasets.load_dataset: "
                          f"{reason}") from e


def hub_fingerprint(name: str, dsd) -> str:
    parts = [name] + [f"{split}:{getattr(ds, '_fingerprint', '')}"
                      for split, ds in sorted(dsd.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


HUB_ADAPTERS: dict[str, HubAdapter] = {a.name: a for a in (
    HubAdapter("Dahoas/rm-static", _keep_format, eval_split="test"),
    HubAdapter("Dahoas/full-hh-rlhf", _keep_format, eval_split="test"),
    HubAdapter("Dahoas/synthetic-instruct-gptj-pairwise", _pairwise),
    HubAdapter("yitingxie/rlhf-reward-datasets", _yitingxie, eval_split="test"),
    HubAdapter("openai/webgpt_comparisons", _webgpt),
    HubAdapter("stanfordnlp/SHP", _shp, eval_split="validation"),
    HubAdapter("pvduy/sharegpt_alpaca_oa_vicuna_format", _sharegpt, eval_split="test"),
    HubAdapter("wangrui6/Zhihu-KOL", _zhihu),
    HubAdapter("Cohere/miracl-zh-queries-22-12", _miracl, eval_split="dev"),
    HubAdapter("Cohere/miracl-ja-queries-22-12", _miracl, eval_split="dev"),
    HubAdapter("Hello-SimpleAI/HC3-Chinese", _hc3, config="all"),
    HubAdapter("mkqa-Chinese", _mkqa("zh_cn"), path="mkqa"),
    HubAdapter("mkqa-Japanese", _mkqa("ja"), path="mkqa"),
    HubAdapter("lmqg/qg_jaquad", _qg_jaquad, eval_split="validation"),
    HubAdapter("lmqg/qag_jaquad", _qag_jaquad, eval_split="validation"),
)}
