"""Turn a model name (built-in, local directory, or hub id) into something from_pretrained loads."""
from __future__ import annotations

import os
import re

from utils.config import ConfigError
from utils.model.smollm2 import smollm2_path
from utils.model.tiny import TINY_FAMILIES, parse_tiny_name, tiny_model_path

SMOLLM2 = "smollm2-135m"
BUILTIN_MODELS = tuple(f"tiny-{f}" for f in TINY_FAMILIES) + (SMOLLM2,)


def not_found(name: str) -> ConfigError:
    return ConfigError(f"model not found: {name} (not a local directory, a built-in name "
                       f"({', '.join(BUILTIN_MODELS)}), or a reachable hub id)")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _could_be_hub_id(name: str) -> bool:
    """Hub ids look like 'name' or 'org/name'; paths like './x', '/x', '~/x', 'a/b/c' do not."""
    return HUB_ID.fullmatch(name) is not None


def resolve_model_path(name_or_path: str) -> str:
    """Built-in name -> its cached directory (built on first use); local directory -> itself;
    anything else is passed through as a hub id (ConfigError if it cannot be one)."""
    name = str(name_or_path)
    if name == SMOLLM2:
        return str(smollm2_path())
    if name.startswith("tiny-"):
        tiny = parse_tiny_name(name)
        if tiny is None:
            raise ConfigError(f"unknown built-in model {name}: tiny-<family> or tiny-<family>-h<hidden size, "
                              f"a multiple of 32 up to 2048> takes one of {', '.join(TINY_FAMILIES)} "
                              f"(or use {SMOLLM2})")
        return str(tiny_model_path(*tiny))
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or not _could_be_hub_id(name):
        raise not_found(name)
    return name

