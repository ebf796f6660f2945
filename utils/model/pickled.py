"""Weights saved by torch.save (`pytorch_model.bin`): read as tensors only, never as objects.

Hub models and DeepSpeed-Chat step outputs often keep their weights only in `pytorch_model.bin`
(or `pytorch_model.bin.index.json` and the shards it names), a pickle. Unpickling can call any
Python function, so these files are read here and only here, with `torch.load(weights_only=True)`:
it rebuilds tensors and plain containers and refuses any other object before creating it. The
state dict read here is handed to transformers, which therefore never unpickles anything itself.

Which files are read, as transformers would pick them: `model.safetensors` (or its index) when
present, else `pytorch_model.bin`, else `pytorch_model.bin.index.json`. Other pickles are never
opened: a `training_args.bin` or `optimizer.pt` next to the weights is ignored, and a folder
whose only weights are in such a file (`*.pt`, `*.pth`, `*.ckpt`, a `.bin` of another name) is
refused, since nothing says which model those tensors belong to.

DeepSpeed-Chat's reward model and critic (its Step 2 and Step 3 outputs) keep their backbone, an
`AutoModel`, under `rwtransformer.` and the value head, a bias-free linear map of the last hidden
state to one number, as `v_head.weight`. A `*ForSequenceClassification` with one label holds the
same weights under its base-model prefix and as `score.weight`, so they are renamed to those.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile

import torch

from utils.config import ConfigError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
OTHER_PICKLES = (".bin", ".pt", ".pth", ".ckpt")
DSCHAT_BACKBONE, DSCHAT_HEAD = "rwtransformer.", "v_head.weight"


def pickled_weight_files(path: str, name: str) -> list[str]:
    """The pickles holding the weights of `path`, a local folder or a hub id (whose files are then
    fetched into the HF cache): [] when it has safetensors weights, which win, or no weights at
    all (from_pretrained then says what is missing)."""
    if os.path.isdir(path):
        return _local_files(path, name)
    return _hub_files(path, name)


def _local_files(folder: str, name: str) -> list[str]:
    if any(os.path.isfile(os.path.join(folder, f)) for f in SAFE_WEIGHTS):
        return []
    if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS)):
        return [os.path.join(folder, PICKLE_WEIGHTS)]
    if os.path.isfile(os.path.join(folder, PICKLE_INDEX)):
        return [os.path.join(folder, shard) for shard in _shards(os.path.join(folder, PICKLE_INDEX), name)]
    others = sorted(f for f in os.listdir(folder) if f.endswith(OTHER_PICKLES))
    if others:
        raise ConfigError(f"{name} holds no model.safetensors or pytorch_model.bin, only {others[0]}: not a "
                          "Hugging Face weights file, so it is not read (load it with the code that wrote it "
                          "and save the model with save_pretrained)")
    return []


def _hub_files(repo: str, name: str) -> list[str]:
    """Fetch a hub repo's pickled weights into the HF cache when it has no safetensors ones.
    A lookup that fails (no such repo, offline, gated) returns []: from_pretrained reports it."""
    from transformers.utils import cached_file

    def fetch(file: str) -> str | None:
        try:
            return cached_file(repo, file, _raise_exceptions_for_missing_entries=False)
        except Exception:  # noqa: BLE001 - any hub error is from_pretrained's to report
            return None

    if any(fetch(f) for f in SAFE_WEIGHTS):
        return []
    weights = fetch(PICKLE_WEIGHTS)
    if weights:
        return [weights]
    index = fetch(PICKLE_INDEX)
    if not index:
        return []
    files = [fetch(shard) for shard in _shards(index, name, check_files=False)]
    if not all(files):
        raise ConfigError(f"cannot load the weights of {name}: a shard named in {PICKLE_INDEX} cannot be fetched")
    return files


def _shards(index: str, name: str, check_files: bool = True) -> list[str]:
    """The shard files an index names, each a plain file name beside it."""
    try:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"cannot load the weights of {name}: {PICKLE_INDEX} is not a valid index "
                          f"({type(err).__name__}: {err})") from err
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ConfigError(f"cannot load the weights of {name}: {PICKLE_INDEX} names {shard!r}, "
                              "not a file beside it")
        if check_files and not os.path.isfile(os.path.join(os.path.dirname(index), shard)):
            raise ConfigError(f"cannot load the weights of {name}: {shard}, named in {PICKLE_INDEX}, is missing")
    return shards


def read_state_dict(files: list[str], name: str) -> dict[str, torch.Tensor]:
    """All tensors of `files`, read with torch.load(weights_only=True) (memory-mapped where the
    file allows it); anything but a flat mapping of names to tensors is one ConfigError line."""
    if torch.__version__ < "2.6":  # CVE-2025-32434: weights_only could be bypassed before 2.6
        raise ConfigError(f"{name} holds its weights as a pickle, which is read safely only with torch 2.6 "
                          f"or newer (this is {torch.__version__})")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        label = os.path.basename(file)
        try:
            part = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except pickle.UnpicklingError as err:
            raise ConfigError(pickle_refusal(name, label, err)) from err
        except Exception as err:  # noqa: BLE001 - truncated or not a torch.save file at all
            raise ConfigError(f"cannot load the weights of {name}: {label} is not a readable torch.save file "
                              f"({' '.join(str(err).split())[:200]})") from err
        if not isinstance(part, dict):
            raise ConfigError(f"cannot load the weights of {name}: {label} is not a state dict (names mapped "
                              f"to tensors) but a {type(part).__name__}")
        for key, value in part.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise ConfigError(f"cannot load the weights of {name}: {label} is not a state dict (names mapped "
                                  f"to tensors): {key!r} is a {type(value).__name__} (a training checkpoint? "
                                  "save the model's state_dict() alone)")
        state.update(part)
    return state


def pickle_refusal(name: str, label: str, err: BaseException) -> str:
    """One line for a pickle that torch.load(weights_only=True) refused, naming what it holds."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return (f"cannot load the weights of {name}: {label} holds Python objects other than tensors"
            f"{f' ({found[1]})' if found else ''}, which unpickling would build by running code; pickled "
            "weights are read as tensors only (torch.load weights_only=True): save the model's state_dict() "
            "alone, or as safetensors")


def is_dschat_reward_model(state: dict) -> bool:
    """A state dict in DeepSpeed-Chat's RewardModel layout (`rwtransformer.*` + `v_head.weight`)."""
    return DSCHAT_HEAD in state and any(k.startswith(DSCHAT_BACKBONE) for k in state)


def dschat_reward_to_sequence_classification(state: dict, base_model_prefix: str) -> dict:
    """Rename DeepSpeed-Chat's `rwtransformer.X` to `<base_model_prefix>.X` and `v_head.weight` to
    `score.weight`, the names of a `*ForSequenceClassification`'s backbone and head."""
    prefix = f"{base_model_prefix}." if base_model_prefix else ""

    def renamed(key: str) -> str:
        if key == DSCHAT_HEAD:
            return "score.weight"
        return prefix + key[len(DSCHAT_BACKBONE):] if key.startswith(DSCHAT_BACKBONE) else key
    return {renamed(k): v for k, v in state.items()}
