"""Plain-text data for Step 3's pretraining (ptx) loss: documents packed into fixed-size blocks."""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable

import datasets

from utils.config import ConfigError, cache_dir
from utils.data.cache import TokenizedDataset, cached, tokenizer_fingerprint
from utils.data.pipeline import encode
from utils.data.raw_datasets import hub_fingerprint, load_hub_dataset
from utils.data.sources import (BUNDLED_FAMILIES, FILE_TYPES, file_hash, load_disk_dataset, looks_like_path,
                                read_records)


def _text_column(where: str, records: list[dict]) -> list[str]:
    if "text" not in records[0]:
        raise ConfigError(f"{where}: needs a 'text' column; it has {list(records[0])}")
    return [r["text"] for r in records if r.get("text") and r["text"].strip()]


def _train_split(ds):
    if isinstance(ds, (datasets.DatasetDict, dict)):
        if not len(ds):
            raise ConfigError("the text data set has no splits")
        return ds["train" if "train" in ds else next(iter(ds))]
    return ds


def _local_docs(path: Path) -> tuple[str, Callable[[], list[str]]]:
    """(fingerprint, loader) of a local .txt/json/jsonl/parquet/csv file or save_to_disk folder."""
    fingerprint = f"local:{file_hash(path)}"
    if path.is_dir():
        def load():
            ds = _train_split(load_disk_dataset(path))
            return _text_column(str(path), ds.to_list()) if len(ds) else []
        return fingerprint, load
    if path.suffix.lower() == ".txt":  # one document per blank-line separated paragraph
        return fingerprint, lambda: [d.strip() for d in re.split(r"\n\s*\n", path.read_text(
            encoding="utf-8")) if d.strip()]
    if path.suffix.lower() in FILE_TYPES:
        return fingerprint, lambda: _text_column(str(path), read_records(path))
    raise ConfigError(f"{path}: unknown file type {path.suffix or '(none)'!r} for text data; "
                      f"expected .txt, {', '.join(FILE_TYPES)} or a save_to_disk folder")


def _text_source(name_or_path: str, config_name: str | None) -> tuple[str, Callable[[], list[str]]]:
    if name_or_path in BUNDLED_FAMILIES:  # a task family's own prose, in its answers' vocabulary
        module = BUNDLED_FAMILIES[name_or_path]
        return f"{name_or_path}:{file_hash(Path(module.__file__))}", module.plain_text_corpus
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _local_docs(path)
    if looks_like_path(name_or_path):
        raise ConfigError(f"text data file not found: {name_or_path}")
    dsd = load_hub_dataset(name_or_path, config_name)
    train = _train_split(dsd)
    return (f"hub:{hub_fingerprint(f'{name_or_path}/{config_name}', {'train': train})}",
            lambda: _text_column(name_or_path, train.to_list()) if len(train) else [])


def pack_blocks(docs_ids: list[list[int]], block: int, eos: int | None,
                seed: int) -> list[list[int]]:
    """Concatenate documents (eos between them), cut into full blocks, shuffle the blocks."""
    stream = []
    for ids in docs_ids:
        if stream and eos is not None:
            stream.append(eos)
        stream.extend(ids)
    blocks = [stream[i:i + block] for i in range(0, len(stream) - block + 1, block)]
    random.Random(seed).shuffle(blocks)
    return blocks


def get_unsupervised_dataset(name_or_path, tokenizer, max_seq_len, output_path, seed,
                             config_name=None) -> TokenizedDataset:
    """A bundled task family's prose ('bundled', 'bundled-constraints'), a local text file/table, or
    a hub data set with a 'text' column -> blocks of
    max_seq_len tokens, items {"input_ids", "labels"} (labels = input_ids)."""
    fingerprint, load_docs = _text_source(str(name_or_path), config_name)
    eos = tokenizer.eos_token_id
    key = {"source": fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer),
           "max_seq_len": max_seq_len, "seed": seed, "eos": eos}

    def build():
        docs = load_docs()
        if not docs:
            raise ConfigError(f"{name_or_path}: the text data set is empty")
        ids = encode(tokenizer, docs, special=False)
        blocks = pack_blocks(ids, max_seq_len, eos, seed)
        if not blocks:
            raise ConfigError(f"{name_or_path}: {sum(map(len, ids))} tokens of text, fewer than "
                              f"one block of max_seq_len={max_seq_len}")
        return {"splits": {"train": {"input_ids": blocks, "labels": blocks}},
                "meta": {"key": key, "documents": len(docs), "blocks": len(blocks)}}

    root = Path(output_path) if output_path else cache_dir() / "data"
    splits, _ = cached(root, "ptx", key, build)
    return splits["train"]
