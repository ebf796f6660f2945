"""utils.rewards: loading reward functions by file and by module, the call contract (row columns
as keyword arguments), weights, None, and the one-line errors."""
from __future__ import annotations

import math
import textwrap

import pytest

from utils.config import ConfigError
from utils.rewards import (RewardFunctionError, combine, load_reward_function, load_reward_functions,
                           weights_for)

REWARDS = textwrap.dedent('''
    def by_answer(prompts, completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    def length(completions):
        return [-len(c.split()) for c in completions]

    def only_named(prompts, completions, answer):
        return [float(a is not None) for a in answer]

    def sometimes(prompts, completions, kind, **kwargs):
        return [1.0 if k == "math" else None for k in kind]

    def raises_on_b(prompts, completions, **kwargs):
        if any(c == "b" for c in completions):
            raise ValueError("cannot score b")
        return [0.0] * len(completions)

    def short(prompts, completions, **kwargs):
        return [1.0]

    def nan(prompts, completions, **kwargs):
        return [float("nan") if c == "x" else 1.0 for c in completions]

    def no_text_args(x):
        return [0.0]

    NOT_A_FUNCTION = 3
''')


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def test_loads_by_file_and_passes_row_columns(reward_file):
    fn = load_reward_function(f"{reward_file}:by_answer")
    assert fn.name == "by_answer" and fn.accepts is None
    scores = fn(["q1", "q2"], [" 4", "5"], [{"answer": "4"}, {"answer": "6"}])
    assert scores == [1.0, 0.0]


def test_loads_by_module(tmp_path, monkeypatch):
    package = tmp_path / "team_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "checks.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_function("team_rewards.checks:by_answer")
    assert fn(["q"], ["4"], [{"answer": "4"}]) == [1.0]
    with pytest.raises(ConfigError, match="must take prompts= and/or completions="):
        load_reward_function("math:sqrt")  # builtins have no named prompts/completions


def test_named_parameters_get_only_their_columns(reward_file):
    fn = load_reward_function(f"{reward_file}:only_named")
    assert fn.accepts == {"prompts", "completions", "answer"}
    # an extra column the function does not name is not passed (it would be a TypeError)
    assert fn(["q"], ["a"], [{"answer": "1", "tests": ["t"]}]) == [1.0]
    # a row without the column passes None for it
    assert fn(["q", "q"], ["a", "b"], [{"answer": "1"}, {}]) == [1.0, 0.0]
    assert load_reward_function(f"{reward_file}:length")(["q"], ["a b c"], [{}]) == [-3.0]


@pytest.mark.parametrize("spec, message", [
    ("nofile.py:f", "file nofile.py not found"),
    ("no_such_module_xyz:f", "cannot import module no_such_module_xyz"),
    ("justaname", "expected FILE.py:NAME"),
    ("{file}:missing", "has no function 'missing'"),
    ("{file}:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
    ("{file}:no_text_args", "must take prompts= and/or completions="),
])
def test_bad_specs_are_one_line(reward_file, spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_reward_function(spec.format(file=reward_file))
    assert "\n" not in str(err.value)


def test_a_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_module_xyz\ndef f(prompts, completions): return []\n")
    with pytest.raises(ConfigError, match="importing .*bad.py failed .*ModuleNotFoundError"):
        load_reward_function(f"{bad}:f")


def test_errors_name_the_function_and_the_row(reward_file):
    origins = ["data.jsonl row 7", "data.jsonl row 9"]
    with pytest.raises(RewardFunctionError, match=r"raises_on_b raised ValueError: cannot score b \(on data.jsonl row 9\)"):
        load_reward_function(f"{reward_file}:raises_on_b")(["p", "p"], ["a", "b"], [{}, {}], origins)
    with pytest.raises(RewardFunctionError, match=r"short returned 1 scores for 2 answers \(rows data.jsonl row 7"):
        load_reward_function(f"{reward_file}:short")(["p", "p"], ["a", "b"], [{}, {}], origins)
    with pytest.raises(RewardFunctionError, match="nan returned nan for data.jsonl row 9"):
        load_reward_function(f"{reward_file}:nan")(["p", "p"], ["a", "x"], [{}, {}], origins)
    assert RewardFunctionError.every_rank  # printed by whichever rank hits it


def test_a_column_no_row_has_is_named(reward_file):
    """A function whose required column the data lacks: one line naming the column and the
    columns the rows do have (not Python's 'missing 1 required positional argument')."""
    fn = load_reward_function(f"{reward_file}:by_answer")
    assert fn.required == {"prompts", "completions", "answer"}
    with pytest.raises(RewardFunctionError, match=r"by_answer needs column\(s\) answer, which the rows "
                       r"p.jsonl: row 1 \.\. p.jsonl: row 2 do not have \(their columns: solution\)"):
        fn(["q", "q"], ["a", "b"], [{"solution": "1"}, {"solution": "2"}], ["p.jsonl: row 1", "p.jsonl: row 2"])


def test_weights_and_none(reward_file):
    fns = load_reward_functions([f"{reward_file}:sometimes", f"{reward_file}:length", f"{reward_file}:length"])
    assert [f.name for f in fns] == ["sometimes", "length", "length_2"]
    columns = [{"kind": "math"}, {"kind": "chat"}]
    parts = {f.name: f(["p", "p"], ["a b", "a b c d"], columns) for f in fns}
    assert parts["sometimes"] == [1.0, None]
    weights = weights_for(list(parts), [2.0, 0.5, 0.0])
    # row 0: 2 * 1 + 0.5 * -2 + 0 * -2; row 1: "sometimes" does not apply
    assert combine(parts, weights, ["r0", "r1"]) == [1.0, -2.0]
    assert weights_for(["a", "b"], []) == {"a": 1.0, "b": 1.0}
    with pytest.raises(ConfigError, match="has 1 values for 2 rewards"):
        weights_for(["a", "b"], [1.0])
    with pytest.raises(ConfigError, match="finite"):
        weights_for(["a"], [math.inf])


def test_a_row_no_reward_applies_to_is_an_error(reward_file):
    fn = load_reward_function(f"{reward_file}:sometimes")
    parts = {"sometimes": fn(["p"], ["a"], [{"kind": "chat"}], ["prompts.jsonl row 3"])}
    with pytest.raises(RewardFunctionError, match="no reward applies to prompts.jsonl row 3"):
        combine(parts, {"sometimes": 1.0}, ["prompts.jsonl row 3"])
