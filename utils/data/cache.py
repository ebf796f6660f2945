"""On-disk cache of tokenized data: flat token ids + row offsets in safetensors (no pickle).

A build lives in `<root>/<prefix>-<key>/` where key hashes everything that changes the result.
Next to a split's `<split>.safetensors` a build may hold `<split>.records.json`, one JSON object
per row (Step 3: each prompt's origin and columns), which the items then carry.
It is written to a temp folder and renamed into place, so a reader never sees half a build. A
filelock serializes independent processes; under torch.distributed the local rank 0 of each node
builds while the other ranks wait at a barrier and then read the finished build.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from utils.config import ConfigError
from utils.fs import atomic_directory_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 4  # bump whenever the way rows are built or stored changes
RECORDS = ".records.json"  # <split>.records.json: the rows' records, in row order
_PROBE = " Human: probe 123 ü 東京 Assistant: ok"


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Class + full tokenizer definition (vocab, merges, post-processor) + special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (backend.to_str() if backend is not None
                  else digest(sorted(tokenizer.get_vocab().items())))
    return digest({
        "class": type(tokenizer).__name__,
        "definition": hashlib.sha256(definition.encode()).hexdigest(),
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "probe": tokenizer(_PROBE)["input_ids"],  # catches settings like add_bos_token
    })


class TokenizedDataset(Dataset):
    """Rows of variable-length token id fields, each item a dict of unpadded LongTensors, plus
    the keys of the row's record when the build has records (Step 3: "origin", "columns")."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path | None = None,
                 records: list[dict] | None = None):
        self.fields = sorted(k for k in tensors if not k.endswith(".offsets"))
        self.flat = {f: tensors[f] for f in self.fields}
        self.offsets = {f: tensors[f + ".offsets"] for f in self.fields}
        self.path = path
        self.records = records
        if records is not None and len(records) != len(self):
            raise ConfigError(f"tokenized data {path}: {len(records)} records for {len(self)} rows")
        self.data_format = ""  # how the rows were rendered (pipeline.data_format), set by the pipeline

    def __len__(self) -> int:
        return len(self.offsets[self.fields[0]]) - 1 if self.fields else 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        item = {f: self.flat[f][self.offsets[f][i]:self.offsets[f][i + 1]].long() for f in self.fields}
        # a copy: whoever reads the columns (a reward function) may change them
        return item if self.records is None else {**copy.deepcopy(self.records[i]), **item}


def _to_tensors(columns: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
    out = {}
    for field, rows in columns.items():
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32,
                           count=int(lengths.sum()))
        out[field] = torch.from_numpy(flat)
        out[field + ".offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    return out


def _write(final: Path, built: dict) -> None:
    def write(tmp: Path) -> None:
        for split, columns in built["splits"].items():
            save_file(_to_tensors(columns), str(tmp / f"{split}.safetensors"))
        for split, records in built.get("records", {}).items():
            (tmp / f"{split}{RECORDS}").write_text(json.dumps(records, ensure_ascii=False, allow_nan=False),
                                                   encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(built.get("meta", {}), indent=1, default=str))

    atomic_directory_write(final, write)  # readers see all of it or nothing


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_builder() -> bool:
    if not _distributed():
        return True
    return int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())) == 0


def _build_locked(final: Path, build: Callable[[], dict]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.exists():
            logger.info("reusing tokenized data %s", final)
            return
        logger.info("building tokenized data %s", final)
        _write(final, build())


def cached(root: Path, prefix: str, key: dict, build: Callable[[], dict]) -> tuple[dict, dict]:
    """Load the build for `key` under root, building it first if missing.

    `build()` returns {"splits": {name: {field: [[ids], ...]}}, "meta": {...}} and optionally
    "records": {name: [one JSON object per row]}. Returns ({split name: TokenizedDataset}, meta).
    """
    final = Path(root).expanduser() / f"{prefix}-{digest({'v': FORMAT_VERSION, **key})[:20]}"
    error = None
    if _is_builder():
        try:
            _build_locked(final, build)
        except Exception as e:  # noqa: BLE001 - re-raised after the barrier so no rank hangs
            error = e
    if _distributed():
        torch.distributed.barrier()
    if error is not None:
        raise error
    if not final.exists():
        raise ConfigError(f"tokenized data {final} was not built by local rank 0 (see its error)")
    splits = {p.stem: TokenizedDataset(load_file(str(p)), final, _records(final / f"{p.stem}{RECORDS}"))
              for p in sorted(final.glob("*.safetensors"))}
    return splits, json.loads((final / "meta.json").read_text())


def _records(path: Path) -> list[dict] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
