"""Split each source between the three steps, blend the sources, tokenize for one step, cache.

`--data_split 2,4,4` gives each step its own seeded, disjoint share of EVERY source (train and
eval rows separately), as DeepSpeed-Chat does, so the reward model and PPO never see the SFT
rows. Tokenization works on ids: the prompt is encoded with the tokenizer's special tokens (a
chat-template prompt holds its own: render.py), the answer without, and the two id lists are
concatenated (never text re-tokenized as a whole).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np

from utils.config import ConfigError, cache_dir, parse_data_split
from utils.data.cache import TokenizedDataset, cached, digest, tokenizer_fingerprint
from utils.data.render import Rendered, chat_template_of, render
from utils.data.sources import Source, resolve_source

logger = logging.getLogger(__name__)

# Phase 2 keeps each prompt's token count (a one-id row) so DPO can score the answer tokens only.
PHASE_FIELDS = {1: ("input_ids", "labels"),
                2: ("chosen_input_ids", "rejected_input_ids", "prompt_length"),
                3: ("prompt_input_ids",)}
_ENCODE_CHUNK = 2048


def split_indices(n: int, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Seeded permutation of range(n) cut into len(fractions) disjoint sorted shares."""
    perm = np.random.RandomState(seed).permutation(n)
    bounds = [0] + [int(round(c * n)) for c in np.cumsum(fractions)]
    bounds[-1] = n
    return [np.sort(perm[bounds[i]:bounds[i + 1]]) for i in range(len(fractions))]


def gather_rows(sources: list[Source], sft_only: list[Source], fractions: list[float],
                phase: int, seed: int, num_examples: int) -> dict[str, list[tuple]]:
    """Rows for `phase`: its share of each source plus (Step 1) the SFT-only sources, shuffled.

    Each row is (source name, sample) so errors can name the source.
    """
    rows = {"train": [], "eval": []}
    for src in sources:
        raw = src.load(seed).capped(num_examples, seed)
        for split, samples in (("train", raw.train), ("eval", raw.eval)):
            share = split_indices(len(samples), fractions, seed)[phase - 1]
            rows[split] += [(src.name, samples[i]) for i in share]
    for src in sft_only:
        raw = src.load(seed).capped(num_examples, seed)
        for split, samples in (("train", raw.train), ("eval", raw.eval)):
            rows[split] += [(src.name, s) for s in samples]
    for split in rows:
        random.Random(seed).shuffle(rows[split])
    return rows


def encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    out = []
    for i in range(0, len(texts), _ENCODE_CHUNK):
        out += tokenizer(texts[i:i + _ENCODE_CHUNK], add_special_tokens=special,
                         verbose=False)["input_ids"]
    return out


def _rendered(rows, keys: tuple[str, ...], tokenizer, template, stats) -> list[Rendered]:
    out = [render(f"{source}: {s.get('origin', 'a row')}", s, keys, tokenizer, template) for source, s in rows]
    stats["template_rows"] += sum(r.template for r in out)
    stats["plain_rows"] += sum(not r.template for r in out)
    return out


def encode_prompts(tokenizer, rendered: list[Rendered]) -> list[list[int]]:
    """Human/Assistant prompts get the tokenizer's special tokens; template ones hold their own."""
    out = [None] * len(rendered)
    for special in (True, False):
        idx = [i for i, r in enumerate(rendered) if r.template != special]
        for i, ids in zip(idx, encode(tokenizer, [rendered[i].prompt for i in idx], special)):
            out[i] = ids
    return out


def _with_chosen(rows, stats) -> list:
    """Steps 1 and 2 learn from answers: prompt-only rows (no chosen answer) are Step 3's alone."""
    kept = [r for r in rows if r[1]["chosen"] is not None]
    stats["without_chosen"] += len(rows) - len(kept)
    return kept


def _sft_columns(rows, tokenizer, max_seq_len, eos, response_loss_only, stats, template):
    rendered = _rendered(_with_chosen(rows, stats), ("chosen",), tokenizer, template, stats)
    prompts = encode_prompts(tokenizer, rendered)
    answers = encode(tokenizer, [r.answers["chosen"] for r in rendered], False)
    cols = {"input_ids": [], "labels": []}
    for p, a, r in zip(prompts, answers, rendered):
        a = a + ([] if r.template else eos)  # a template's answer ends its turn itself
        ids = (p + a)[:max_seq_len]
        labels = ([-100] * len(p) + a)[:max_seq_len] if response_loss_only else ids
        if all(t == -100 for t in labels):
            stats["no_answer_tokens"] += 1  # prompt fills max_seq_len: nothing to learn
            continue
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
    return cols


def _pair_columns(rows, tokenizer, max_seq_len, eos, stats, template):
    rows = _with_chosen(rows, stats)
    pairs = [r for r in rows if r[1]["rejected"] is not None]
    stats["without_rejected"] += len(rows) - len(pairs)
    for source, s in pairs:
        if s["chosen"] == s["rejected"]:
            raise ConfigError(f"{source}: {s.get('origin', 'a row')} (0-based) has a chosen "
                              "answer equal to the rejected one")
    rendered = _rendered(pairs, ("chosen", "rejected"), tokenizer, template, stats)
    prompts = encode_prompts(tokenizer, rendered)
    chosen = encode(tokenizer, [r.answers["chosen"] for r in rendered], False)
    rejected = encode(tokenizer, [r.answers["rejected"] for r in rendered], False)
    cols = {"chosen_input_ids": [], "rejected_input_ids": [], "prompt_length": []}
    for p, c, r, how in zip(prompts, chosen, rejected, rendered):
        end = [] if how.template else eos
        if how.template:  # score where Step 3's answers end: at the end-of-text token
            c, r = _through_eos(c, tokenizer.eos_token_id), _through_eos(r, tokenizer.eos_token_id)
        chosen_ids, rejected_ids = (p + c + end)[:max_seq_len], (p + r + end)[:max_seq_len]
        if chosen_ids == rejected_ids:  # the answers differ only past max_seq_len: nothing to compare
            stats["same_after_cut"] += 1
            continue
        cols["chosen_input_ids"].append(chosen_ids)
        cols["rejected_input_ids"].append(rejected_ids)
        cols["prompt_length"].append([min(len(p), max_seq_len)])
    return cols


def _through_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """A template's answer up to and including its last end-of-text token: templates such as
    ChatML add a newline after it, but Step 3's answers stop at the token (the reward model reads
    its score at the last one)."""
    if eos_id is None or eos_id not in ids:
        return ids
    return ids[:len(ids) - ids[::-1].index(eos_id)]


def _prompt_columns(rows, tokenizer, max_prompt_seq_len, stats, template):
    prompts = encode_prompts(tokenizer, _rendered(rows, (), tokenizer, template, stats))
    stats["truncated_prompts"] += sum(len(p) > max_prompt_seq_len for p in prompts)
    return {"prompt_input_ids": [p[-max_prompt_seq_len:] for p in prompts]}  # keep the end


def prompt_records(rows) -> list[dict]:
    """Step 3's per-prompt record, in row order: where it came from and the row's other columns
    (what a reward function may need besides the text)."""
    return [{"origin": f"{source}: {s.get('origin', 'a row')}", "columns": s.get("columns", {})}
            for source, s in rows]


_STATS = ("no_answer_tokens", "without_rejected", "without_chosen", "truncated_prompts", "same_after_cut",
         "template_rows", "plain_rows")


def tokenize_rows(rows, phase, tokenizer, max_seq_len, eos_token_id=None,
                  response_loss_only=False, max_prompt_seq_len=None, stats=None, template=None):
    """Tagged rows -> {field: [ids, ...]} for one step (see PHASE_FIELDS); `template`: the chat
    template for conversational rows (render.chat_template_of), None for Human/Assistant text."""
    eos = [] if eos_token_id is None else [int(eos_token_id)]
    stats = stats if stats is not None else {}
    for k in _STATS:
        stats.setdefault(k, 0)
    if phase == 1:
        return _sft_columns(rows, tokenizer, max_seq_len, eos, response_loss_only, stats, template)
    if phase == 2:
        return _pair_columns(rows, tokenizer, max_seq_len, eos, stats, template)
    return _prompt_columns(rows, tokenizer, max_prompt_seq_len or max_seq_len, stats, template)


def data_format(stats: dict) -> str:
    """How a build's rows were rendered: template, human_assistant, or mixed (some of each)."""
    if not stats.get("template_rows"):
        return "human_assistant"
    return "mixed" if stats.get("plain_rows") else "template"


def _report(meta: dict, phase: int) -> None:
    stats = meta["stats"]
    if stats.get("truncated_prompts"):
        logger.warning("Step 3: %d prompts were longer than %d tokens and were cut from the left",
                       stats["truncated_prompts"], meta["max_prompt_seq_len"])
    if stats.get("no_answer_tokens"):
        logger.warning("Step 1: dropped %d rows whose prompt fills max_seq_len (no answer tokens)",
                       stats["no_answer_tokens"])
    if stats.get("same_after_cut"):
        logger.warning("Step 2: dropped %d pairs whose chosen and rejected answers are the same within "
                       "max_seq_len %d tokens (the prompt is longer, or the answers differ only later)",
                       stats["same_after_cut"], meta["key"]["max_seq_len"])
    if phase == 2 and stats.get("without_rejected"):
        logger.warning("Step 2: skipped %d rows without a rejected answer",
                       stats["without_rejected"])
    if phase != 3 and stats.get("without_chosen"):
        logger.warning("Step %d: skipped %d prompt-only rows (no chosen answer; Step 3 uses them)",
                       phase, stats["without_chosen"])


def _all_dropped(stats: dict, max_seq_len: int) -> str:
    """Why a build has no rows left, when --max_seq_len is the reason."""
    cut = stats.get("same_after_cut", 0) + stats.get("no_answer_tokens", 0)
    return (f"; --max_seq_len {max_seq_len} dropped {cut} rows (a prompt that fills it leaves no answer "
            "to learn from or to compare)" if cut else "")


def _no_rows(phase: int, paths: list, data_split: str, meta: dict, max_seq_len: int) -> str:
    """The one line for a step left without training rows, with the reasons the build saw."""
    prompt_only = meta.get("prompt_only", [])
    why = (f" ({', '.join(prompt_only)}: prompt-only, no chosen answers; Step {phase} needs rows with a "
           "chosen answer, prompt-only data serves Step 3)" if prompt_only and phase != 3 else
           " (Step 2 needs sources with rejected answers)" if phase == 2 else "")
    return (f"no Step {phase} training rows from {paths} with --data_split {data_split}" + why
            + _all_dropped(meta["stats"], max_seq_len))


def _prompt_only(rows: dict[str, list[tuple]]) -> list[str]:
    """The sources none of whose rows here has a chosen answer."""
    tagged = [r for split in rows.values() for r in split]
    return sorted({src for src, _ in tagged} - {src for src, s in tagged if s["chosen"] is not None})


def _cache_key(sources, sft_only, tokenizer, template, phase, **settings) -> dict:
    """Everything that changes a build (cache.cached hashes it with the format version)."""
    return {"sources": [s.fingerprint() for s in sources], "sft_only": [s.fingerprint() for s in sft_only],
            "tokenizer": tokenizer_fingerprint(tokenizer), "phase": phase,
            "template": digest(template) if template else None, **settings}


def create_prompt_dataset(data_path, data_split, output_path, train_phase, seed, tokenizer,
                          max_seq_len, eos_token_id=None, sft_only_data_path=(), num_examples=0,
                          response_loss_only=False, max_prompt_seq_len=None, chat_template="auto"
                          ) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Blended, tokenized (train, eval) torch Datasets for step `train_phase` (1, 2 or 3).

    `chat_template` (auto | none) says how conversational rows are rendered (render.py); each
    dataset's `data_format` says how its rows were. Step 3's items also carry each prompt's
    "origin" and "columns" (prompt_records), which DataCollatorPrompt batches.
    """
    if train_phase not in PHASE_FIELDS:
        raise ConfigError(f"train_phase must be 1, 2 or 3, got {train_phase!r}")
    if max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be positive, got {max_seq_len}")
    paths = [data_path] if isinstance(data_path, (str, Path)) else list(data_path)
    sft_paths = [sft_only_data_path] if isinstance(sft_only_data_path, (str, Path)) else list(
        sft_only_data_path or ())
    if not paths and not sft_paths:
        raise ConfigError("no data: --data_path is empty")
    fractions = parse_data_split(data_split)
    template = chat_template_of(tokenizer, chat_template)
    sources = [resolve_source(p) for p in paths]
    sft_only = [resolve_source(p) for p in sft_paths] if train_phase == 1 else []
    max_prompt = (max_prompt_seq_len or max_seq_len) if train_phase == 3 else None
    key = _cache_key(sources, sft_only, tokenizer, template, train_phase, max_seq_len=max_seq_len,
                     split=fractions, seed=seed, eos=eos_token_id if train_phase != 3 else None,
                     response_loss_only=bool(response_loss_only) and train_phase == 1,
                     num_examples=num_examples, max_prompt_seq_len=max_prompt, chat_template=chat_template)

    def build():
        rows = gather_rows(sources, sft_only, fractions, train_phase, seed, num_examples)
        stats = {}
        splits = {split: tokenize_rows(rows[split], train_phase, tokenizer, max_seq_len, eos_token_id,
                                       response_loss_only, max_prompt, stats, template)
                  for split in ("train", "eval")}
        built = {"splits": splits, "meta": {
            "key": key, "stats": stats, "max_prompt_seq_len": max_prompt, "prompt_only": _prompt_only(rows),
            "rows": {s: len(c[PHASE_FIELDS[train_phase][0]]) for s, c in splits.items()}}}
        if train_phase == 3:  # every row is kept, so the records line up with the prompts
            built["records"] = {split: prompt_records(rows[split]) for split in splits}
        return built

    root = Path(output_path) if output_path else cache_dir() / "data"
    splits, meta = cached(root, f"step{train_phase}", key, build)
    _report(meta, train_phase)
    for dataset in splits.values():
        dataset.data_format = data_format(meta["stats"])
    if len(splits["train"]) == 0:
        raise ConfigError(_no_rows(train_phase, paths + sft_paths, data_split, meta, max_seq_len))
    return splits["train"], splits["eval"]
