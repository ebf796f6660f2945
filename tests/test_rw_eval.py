"""rw_eval: scores from the command line match the reward model on training-format token ids."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_exit, assert_ok
from utils.model import load_reward_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODULE = "training.step2_reward_model_finetuning.rw_eval"


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    tok = load_tokenizer("tiny-llama")
    torch.manual_seed(0)
    load_reward_model("tiny-llama", tok).hf_model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def rw_eval(*args):
    return subprocess.run([sys.executable, "-m", MODULE, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_scores_match_training_tokenization(reward_dir, tmp_path):
    from utils.data import DataCollatorReward, create_prompt_dataset
    rows = [{"prompt": "What is 2 + 3? Answer with the number only.", "chosen": "5", "rejected": "The answer is 6."}]
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n")
    proc = rw_eval("--model_name_or_path", str(reward_dir), "--prompt", rows[0]["prompt"],
                   "--response", "5", "--response", "The answer is 6.")
    assert_ok(proc)
    printed = [float(line.split()[0]) for line in proc.stdout.splitlines() if line.startswith("  ")]

    tok = load_tokenizer(str(reward_dir))
    train, held_out = create_prompt_dataset([str(data)], "0,1,0", str(tmp_path / "cache"), 2, 1, tok, 64,
                                            eos_token_id=tok.eos_token_id)
    items = [ds[i] for ds in (train, held_out) for i in range(len(ds))]  # the one row, wherever it fell
    assert len(items) == 1
    batch = DataCollatorReward(tok.pad_token_id)(items)
    model = load_reward_model(str(reward_dir), tok).eval()
    with torch.no_grad():
        expected = model.score(batch["input_ids"], batch["attention_mask"]).tolist()
    assert printed == pytest.approx(expected, abs=1e-3)


def test_file_of_pairs_reports_accuracy(reward_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n"
                            for i in range(3)))
    proc = rw_eval("--model_name_or_path", str(reward_dir), "--file", str(data))
    assert_ok(proc)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("pair accuracy")
    assert all("chosen_score" in json.loads(l) for l in lines[:3])


def test_bad_file_row_is_one_line(reward_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "x"}\n')
    proc = rw_eval("--model_name_or_path", str(reward_dir), "--file", str(data))
    assert_exit(proc, 2)
    assert "row 0 needs prompt" in proc.stderr.strip().splitlines()[-1]
