"""Reward functions: a user's Python function that scores answers as text.

`--reward_fn FILE.py:NAME` or `--reward_fn package.module:NAME` names one; the flag repeats and
`--reward_weights` weighs them. A function is called as TRL calls its reward functions:

    fn(prompts=[...], completions=[...], **columns) -> [float | None, ...]

with the prompts as the policy saw them, the answers, and every other column of the data set
row (e.g. `answer`, `tests`) as a list aligned with the answers. A function that names its
parameters gets only those columns; one with **kwargs gets them all. `None` means "does not apply
to this row": the row's score is the weighted sum of the functions that apply. A function that
raises, returns the wrong number of scores or a non-finite one stops the run with one line that
names the function and the row (a wrong score would teach the policy something false).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from utils.config import ConfigError

SCORE_KWARGS = ("prompts", "completions")


class RewardFunctionError(ConfigError):
    """A reward function failed on some row. Unlike a flag error it can happen on one rank
    only, so every rank prints it (utils.cli.run_entry)."""
    every_rank = True


@dataclass(frozen=True)
class RewardFunction:
    """A loaded reward function: `name` labels its metrics, `spec` is what the user gave."""
    name: str
    spec: str
    fn: Callable
    accepts: frozenset[str] | None  # parameter names; None when it takes **kwargs
    required: frozenset[str] = frozenset()  # parameters without a default

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], columns: Sequence[dict],
                 origins: Sequence[str] | None = None) -> list[float | None]:
        """One checked score (or None) per answer; see the module docstring."""
        origins = list(origins) if origins is not None else [f"answer {i}" for i in range(len(completions))]
        kwargs = self._kwargs(prompts, completions, columns)
        missing = sorted(self.required - set(kwargs))
        if missing:  # else Python's "missing 1 required positional argument" hides which data lacks it
            have = sorted({name for row in columns for name in row} - set(SCORE_KWARGS)) or ["none"]
            raise RewardFunctionError(
                f"reward function {self.name} needs column(s) {', '.join(missing)}, which the rows "
                f"{origins[0]} .. {origins[-1]} do not have (their columns: {', '.join(have)})")
        try:
            scores = self.fn(**kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of user code stops the run, named
            raise RewardFunctionError(f"reward function {self.name} raised {type(e).__name__}: {e} "
                                      f"(on {self._failing_row(kwargs, origins)})") from e
        return self._checked(scores, origins)

    def _kwargs(self, prompts, completions, columns) -> dict:
        names = sorted({name for row in columns for name in row} - set(SCORE_KWARGS))
        given = {"prompts": list(prompts), "completions": list(completions),
                 **{name: [row.get(name) for row in columns] for name in names}}
        return given if self.accepts is None else {k: v for k, v in given.items() if k in self.accepts}

    def _failing_row(self, kwargs: dict, origins: list[str]) -> str:
        """The first row the function raises on alone (the whole batch when none does)."""
        for i, origin in enumerate(origins):
            try:
                self.fn(**{k: v[i:i + 1] for k, v in kwargs.items()})
            except Exception:  # noqa: BLE001
                return origin
        return f"the batch of {len(origins)} answers"

    def _checked(self, scores, origins: list[str]) -> list[float | None]:
        try:
            scores = list(scores)
        except TypeError:
            raise RewardFunctionError(f"reward function {self.name} returned {type(scores).__name__}, "
                                      "not a list of floats") from None
        if len(scores) != len(origins):
            raise RewardFunctionError(f"reward function {self.name} returned {len(scores)} scores for "
                                      f"{len(origins)} answers (rows {origins[0]} .. {origins[-1]})")
        out = []
        for score, origin in zip(scores, origins):
            if score is not None:
                try:
                    score = float(score)
                except (TypeError, ValueError):
                    raise RewardFunctionError(f"reward function {self.name} returned {score!r} for "
                                              f"{origin}: not a number") from None
                if not math.isfinite(score):
                    raise RewardFunctionError(f"reward function {self.name} returned {score} for {origin}")
            out.append(score)
        return out


def _module_from_file(path: Path, spec: str):
    """Import a .py file as a module of its own (named after its path, so two files both called
    rewards.py do not collide)."""
    name = "rlhfkit_reward_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file failing to import is a flag error
        del sys.modules[name]
        raise ConfigError(f"--reward_fn {spec}: importing {path} failed ({type(e).__name__}: {e})") from e
    return module


def _module(target: str, spec: str):
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"--reward_fn {spec}: file {target} not found")
        return _module_from_file(path, spec)
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ConfigError(f"--reward_fn {spec}: cannot import module {target} ({e})") from e


def load_reward_function(spec: str) -> RewardFunction:
    """`FILE.py:NAME` or `package.module:NAME` -> a RewardFunction; one clear line if it is not."""
    target, sep, attr = str(spec).rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"--reward_fn {spec!r}: expected FILE.py:NAME or package.module:NAME")
    fn = getattr(_module(target, spec), attr, None)
    if not callable(fn):
        raise ConfigError(f"--reward_fn {spec}: {target} has no function {attr!r}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it everything
        params = ()
    var_kw = not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    accepts = None if var_kw else frozenset(p.name for p in params)
    required = frozenset(p.name for p in params if p.default is inspect.Parameter.empty
                         and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    if accepts is not None and not set(SCORE_KWARGS) & accepts:
        raise ConfigError(f"--reward_fn {spec}: {attr} must take prompts= and/or completions= "
                          f"(it takes {', '.join(sorted(accepts)) or 'nothing'})")
    return RewardFunction(attr, str(spec), fn, accepts, required)


def load_reward_functions(specs: Sequence[str]) -> list[RewardFunction]:
    """Every --reward_fn, each named uniquely in the metrics (a repeated name gets a suffix)."""
    loaded, seen = [], {}
    for spec in specs:
        f = load_reward_function(spec)
        seen[f.name] = seen.get(f.name, 0) + 1
        if seen[f.name] > 1:
            f = RewardFunction(f"{f.name}_{seen[f.name]}", f.spec, f.fn, f.accepts)
        loaded.append(f)
    return loaded


def weights_for(names: Sequence[str], weights: Sequence[float]) -> dict[str, float]:
    """name -> weight: all 1 when none are given, else exactly one per name, in order."""
    if not weights:
        return {name: 1.0 for name in names}
    if len(weights) != len(names):
        raise ConfigError(f"--reward_weights has {len(weights)} values for {len(names)} rewards "
                          f"({', '.join(names)}): give one per reward, in that order")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"--reward_weights must be finite numbers, got {list(weights)}")
    return dict(zip(names, map(float, weights)))


def combine(parts: dict[str, Sequence[float | None]], weights: dict[str, float],
            origins: Sequence[str]) -> list[float]:
    """Per answer, the weighted sum of the scores that apply (not None); an answer no reward
    applies to has no score at all, which is an error, not a 0."""
    out = []
    for i, origin in enumerate(origins):
        applied = [(weights[name], scores[i]) for name, scores in parts.items() if scores[i] is not None]
        if not applied:
            raise RewardFunctionError(f"no reward applies to {origin}: every reward function returned None "
                                      f"({', '.join(parts)})")
        out.append(sum(w * s for w, s in applied))
    return out
