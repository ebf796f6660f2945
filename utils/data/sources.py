"""Resolving a `--data_path` entry to a source: a hub adapter, a local file/folder, or 'bundled'.

A source knows its content fingerprint (for the cache key) before it is converted, so an
unchanged cached build needs no parsing: local files hash their bytes, folders hash every file,
'bundled' hashes its generator's source, hub data sets use `datasets`' own fingerprint.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import datasets

from utils.config import ConfigError
from utils.data import bundled, constraints
from utils.data.raw_datasets import (HUB_ADAPTERS, RawDataset, as_answer, as_prompt,
                                     hub_fingerprint, holdout, human_prompt, load_hub_dataset,
                                     make_sample, with_origin)

logger = logging.getLogger(__name__)

FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv")
EVAL_SPLITS = ("test", "validation", "eval", "dev")
BUNDLED_NUM = 6000
# The bundled task's test split is fixed, as a hub data set's is: runs with different --seed
# values then never evaluate on each other's training pairs. 1234 is the toolkit's default seed,
# so the split is the one that default runs always had.
BUNDLED_SPLIT_SEED = 1234
BUNDLED_FAMILIES = {"bundled": bundled, "bundled-constraints": constraints}  # --data_path name -> module


# ---- reading local files into records ---------------------------------------------------------

def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {n} is not valid JSON ({e.msg})") from e
    return records


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json
            return read_jsonl(path)
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}  # {"prompt": [...], "chosen": [...]} columns
        if len(lengths) == 1:
            return [dict(zip(data, vals)) for vals in zip(*data.values())]
    if isinstance(data, list):
        return data
    raise ConfigError(f"{path}: expected a list of records or a dict of columns, got "
                      f"{type(data).__name__}")


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: (v if v != "" else None) for k, v in row.items()}
                    for row in csv.DictReader(f)]
    except (csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable CSV file ({e})") from e


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable parquet file ({e})") from e


_READERS = {".json": _read_json, ".jsonl": read_jsonl, ".csv": _read_csv,
            ".parquet": _read_parquet}


def read_records(path: Path) -> list[dict]:
    """The rows of a local json/jsonl/csv/parquet file as a list of dicts."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(f"{path}: unknown file type {path.suffix or '(none)'!r}; expected "
                          f"{', '.join(FILE_TYPES)} or a folder written by save_to_disk")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: the file is empty")
    try:
        records = reader(path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason})") from e
    if not records:
        raise ConfigError(f"{path}: the file holds no rows")
    if not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{path}: every row must be an object with named columns")
    return records


def _saved_without_rows(path: Path) -> bool:
    """save_to_disk of an empty Dataset writes no data file, which load_from_disk then trips on."""
    state = path / "state.json"
    try:
        return state.is_file() and json.loads(state.read_text()).get("_data_files") == []
    except (OSError, json.JSONDecodeError):
        return False


def load_disk_dataset(path: Path):
    if _saved_without_rows(path):
        raise ConfigError(f"{path}: the data set is empty")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means "not a save_to_disk folder"
        raise ConfigError(f"{path}: a folder that datasets.load_from_disk cannot read "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


# ---- records -> samples ---------------------------------------------------------------------

def _last_assistant(messages) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    return -1


def _turn(message: dict) -> str:
    role = {"user": "Human", "assistant": "Assistant"}.get(message["role"], message["role"].title())
    return f" {role}: {message['content'].strip()}"


def _answer(value) -> str | None:
    """A chosen/rejected value: plain text, or a conversation whose last assistant turn counts."""
    if value is None or value == "":
        return None
    if not isinstance(value, list):
        return as_answer(str(value))
    i = _last_assistant(value)
    return as_answer(value[i]["content"]) if i >= 0 else None


def conversation_sample(prompt_messages: list, chosen, rejected=None) -> dict | None:
    """A conversational prompt ([{role, content}, ...]) and its answers: the Human/Assistant text
    of every turn, plus the messages themselves for the tokenizer's chat template."""
    if not prompt_messages:
        return None
    prompt = "".join(_turn(m) for m in prompt_messages) + " Assistant:"
    return {**make_sample(prompt, _answer(chosen), _answer(rejected)),
            "prompt_messages": [dict(m) for m in prompt_messages]}


def chat_sample(messages: list, rejected=None) -> dict | None:
    """[{role, content}, ...] -> prompt of every turn before the last assistant one, chosen = it.
    A conversation that ends on another turn awaits the assistant: a prompt-only row."""
    if not messages:
        return None
    last = _last_assistant(messages)
    if last < len(messages) - 1:
        return conversation_sample(messages, None, rejected)
    return conversation_sample(messages[:last], messages[last]["content"], rejected)


def _answer_column(record: dict) -> str:
    """The column holding the (chosen) answer: "chosen", or TRL's prompt-completion "completion"
    (not in its unpaired-preference rows, whose "label" may say the completion is bad)."""
    return "completion" if "chosen" not in record and "completion" in record and "label" not in record else "chosen"


def _whole_conversation(value) -> bool:
    """A chosen/rejected list that holds its own prompt (a user turn), not only the answer."""
    return isinstance(value, list) and any(m.get("role") != "assistant" for m in value)


def _record_sample(record: dict) -> dict | None:
    if "messages" in record:
        return chat_sample(record["messages"] or [], record.get("rejected"))
    prompt, chosen, rejected = record.get("prompt"), record.get(_answer_column(record)), record.get("rejected")
    if isinstance(prompt, list):  # a conversational prompt; answers as text or assistant turns
        return conversation_sample(prompt, chosen, rejected)
    if _whole_conversation(chosen):  # chosen/rejected as whole conversations (the prompt implicit)
        return chat_sample(chosen, rejected)
    if not prompt:
        return None
    return make_sample(as_prompt(str(prompt)), _answer(chosen), _answer(rejected))


SAMPLE_COLUMNS = ("prompt", "chosen", "rejected", "messages")  # the rest go to sample["columns"]


def row_columns(where: str, record: dict) -> dict:
    """The row's other columns, refused unless JSON can carry them (the Step 3 cache stores them
    as JSON, and a reward function gets exactly what the file held)."""
    used = {*SAMPLE_COLUMNS, _answer_column(record)}
    columns = {k: v for k, v in record.items() if k not in used}
    for name, value in columns.items():
        if not _json_able(value):
            raise ConfigError(f"{where}: column {name!r} holds a {type(value).__name__} value, which JSON "
                              "cannot carry to Step 3; convert it (e.g. to text) or drop the column")
    return columns


def _json_able(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _checked_sample(where: str):
    def convert(item):
        i, record = item
        try:
            sample = _record_sample(record)
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{where}: row {i} is malformed ({type(e).__name__}: {e})") from e
        if sample is None:
            return None
        return {**sample, "columns": row_columns(f"{where}: row {i}", record)}
    return convert


def records_to_samples(where: str, records: list[dict]) -> list[dict]:
    """Rows -> samples; a row with a prompt and no chosen answer is a prompt-only sample (Step 3)."""
    columns = list(records[0])
    chat = "messages" in columns or isinstance(records[0].get("chosen"), list)
    if not chat and "prompt" not in columns:
        raise ConfigError(f"{where}: needs a 'prompt' column ('chosen' or 'completion', 'rejected' "
                          f"optional) or 'messages'; it has {columns}")
    samples = with_origin(map(_checked_sample(where), enumerate(records)), "")
    if len(samples) < len(records):
        logger.warning("%s: skipped %d of %d rows with an empty prompt", where,
                       len(records) - len(samples), len(records))
    if not samples:
        raise ConfigError(f"{where}: no row has a prompt")
    return samples


# ---- sources --------------------------------------------------------------------------------

class Source:
    """One entry of --data_path: `fingerprint()` is cheap and stable, `load(seed)` converts."""
    name: str

    def fingerprint(self) -> str:
        raise NotImplementedError

    def load(self, seed: int) -> RawDataset:
        raise NotImplementedError


class FileSource(Source):
    def __init__(self, path: Path):
        self.name, self.path = str(path), path

    def fingerprint(self) -> str:
        return f"file:{file_hash(self.path)}"

    def load(self, seed: int) -> RawDataset:
        train, eval_ = holdout(records_to_samples(self.name, read_records(self.path)), seed)
        return RawDataset(self.name, train, eval_, self.fingerprint())


def _split_dataset_dict(where: str, dsd, seed: int, convert) -> tuple[list, list]:
    """train (or the only split) -> train; test/validation/eval/dev -> eval, else hold out."""
    if not len(dsd):
        raise ConfigError(f"{where}: the data set has no splits")
    train_name = "train" if "train" in dsd else next(iter(dsd))
    eval_name = next((s for s in EVAL_SPLITS if s in dsd and s != train_name), None)
    train = convert(dsd[train_name])
    if eval_name is None:
        return holdout(train, seed)
    return train, convert(dsd[eval_name])


def _dataset_samples(where: str, ds) -> list[dict]:
    if len(ds) == 0:
        raise ConfigError(f"{where}: the data set is empty")
    return records_to_samples(where, ds.to_list())


class DiskSource(Source):
    """A folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""

    def __init__(self, path: Path):
        self.name, self.path = str(path), path

    def fingerprint(self) -> str:
        return f"dir:{file_hash(self.path)}"

    def load(self, seed: int) -> RawDataset:
        ds = load_disk_dataset(self.path)
        if isinstance(ds, datasets.Dataset):
            ds = datasets.DatasetDict({"train": ds})
        train, eval_ = _split_dataset_dict(self.name, ds, seed,
                                           lambda d: _dataset_samples(self.name, d))
        return RawDataset(self.name, train, eval_, self.fingerprint())


class HubSource(Source):
    """A hub data set: a known adapter, or any name whose rows use the local-file schema."""

    def __init__(self, name: str):
        self.name = name
        self.adapter = HUB_ADAPTERS.get(name)
        self._dsd = None

    def _loaded(self):
        if self._dsd is None:
            self._dsd = self.adapter.load_hub() if self.adapter else load_hub_dataset(self.name)
            if isinstance(self._dsd, datasets.Dataset):
                self._dsd = datasets.DatasetDict({"train": self._dsd})
        return self._dsd

    def fingerprint(self) -> str:
        return f"hub:{hub_fingerprint(self.name, self._loaded())}"

    def load(self, seed: int) -> RawDataset:
        if self.adapter:
            return self.adapter.to_raw(self._loaded(), seed)
        train, eval_ = _split_dataset_dict(self.name, self._loaded(), seed,
                                           lambda d: _dataset_samples(self.name, d))
        return RawDataset(self.name, train, eval_, self.fingerprint())


class BundledSource(Source):
    """An embedded verifiable task family (utils.data.bundled, or utils.data.constraints as
    'bundled-constraints'), with the same fixed held-out share."""

    def __init__(self, num: int = BUNDLED_NUM, family: str = "bundled"):
        if family not in BUNDLED_FAMILIES:
            raise ConfigError(f"unknown bundled family {family!r} (known: {', '.join(BUNDLED_FAMILIES)})")
        self.num, self.name = num, family
        self.module = BUNDLED_FAMILIES[family]

    def fingerprint(self) -> str:
        return f"{self.name}:{self.num}:split{BUNDLED_SPLIT_SEED}:{file_hash(Path(self.module.__file__))}"

    def load(self, seed: int) -> RawDataset:
        samples = with_origin(map(_bundled_sample, self.module.generate_examples(num=self.num, seed=0)),
                              "")
        train, eval_ = holdout(samples, BUNDLED_SPLIT_SEED)
        return RawDataset(self.name, train, eval_, self.fingerprint())


def _bundled_sample(row: dict) -> dict:
    sample = make_sample(human_prompt(row["prompt"]), as_answer(row["chosen"]), as_answer(row["rejected"]))
    if "constraints" in row:  # the checker's input, carried to Step 3's reward functions
        sample["columns"] = {"constraints": json.dumps(row["constraints"])}
    return sample


def looks_like_path(spec: str) -> bool:
    return (spec.startswith((".", "/", "~")) or "\\" in spec
            or Path(spec).suffix.lower() in FILE_TYPES + (".txt",))


def resolve_source(spec: str) -> Source:
    """bundled(-constraints) | a DeepSpeed-Chat hub name | a local file/folder | any other hub name."""
    spec = str(spec)
    if spec in BUNDLED_FAMILIES:
        return BundledSource(family=spec)
    if spec in HUB_ADAPTERS:
        return HubSource(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return DiskSource(path)
    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise ConfigError(f"{spec}: unknown file type {path.suffix or '(none)'!r}; expected "
                              f"{', '.join(FILE_TYPES)} or a folder written by save_to_disk")
        return FileSource(path)
    if looks_like_path(spec):
        raise ConfigError(f"data file not found: {spec}")
    return GuardedHubSource(spec)


class GuardedHubSource(HubSource):
    """An unknown name: say plainly that it is neither known, local, nor loadable."""

    def _loaded(self):
        try:
            return super()._loaded()
        except ConfigError as e:
            cause = str(e.__cause__ or e).strip().splitlines() or [type(e.__cause__).__name__]
            raise ConfigError(f"data path {self.name!r} is neither a known data set "
                              f"({', '.join([*BUNDLED_FAMILIES, *HUB_ADAPTERS])}), a local path, nor loadable "
                              f"from the hub ({cause[0]})") from e


def load_raw_dataset(name_or_path: str, seed: int = 1234, num_examples: int = 0) -> RawDataset:
    """Any --data_path entry as a RawDataset (at most num_examples train rows when > 0)."""
    return resolve_source(name_or_path).load(seed).capped(num_examples, seed)
