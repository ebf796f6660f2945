"""prompt_eval refuses bad input with one line before loading any model (the run itself is
tested on the quick pipeline's outputs in test_train_launcher)."""
from __future__ import annotations

import pytest

from tests.helpers import error_line, run_module

MODELS = ["--model_name_or_path_baseline", "tiny-llama", "--model_name_or_path_finetune", "tiny-llama"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "missing.txt does not exist"),
    ("bad.jsonl", '{"prompt": "Is 7 odd?"}\nnot json\n', "bad.jsonl: line 2 is not valid JSON"),
    ("noprompt.jsonl", '{"question": "Is 7 odd?"}\n', "noprompt.jsonl record 1: expected a JSON object with a 'prompt' field"),
    ("empty.txt", "\n  \n", "no prompts to evaluate"),
])
def test_bad_prompt_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    proc = run_module("inference.prompt_eval", [*MODELS, "--prompt_file", path], timeout=120)
    assert message in error_line(proc)


def test_non_positive_sizes_are_refused():
    proc = run_module("inference.prompt_eval", [*MODELS, "--num_prompts", 0], timeout=120)
    assert "must be at least 1" in error_line(proc)
