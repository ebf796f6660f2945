"""Step 2 end to end on tiny models: ZeRO stages, LoRA, two processes, reload both ways, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_exit, assert_ok, run_module
from utils.cli import free_port

MODULE = "training.step2_reward_model_finetuning.main"
QUICK = ["--model_name_or_path", "tiny-llama", "--num_examples", "400", "--max_seq_len", "64",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
         "--learning_rate", "2e-3", "--dtype", "fp32", "--max_steps", "10", "--disable_tqdm",
         "--log_interval", "5"]


def run(args, launcher=None, timeout=600):
    return run_module(MODULE, args, launcher, timeout)


def trained(proc, out: Path) -> dict:
    assert_ok(proc)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 10
    for key in ("accuracy", "chosen_score", "rejected_score", "margin", "loss"):
        assert f"{key}_before" in summary and f"{key}_after" in summary
    from utils.metrics import read_jsonl
    train = [r["train/loss"] for r in read_jsonl(out / "logs" / "metrics.jsonl") if "train/loss" in r]
    assert len(train) == 2 and train[1] < train[0]  # steps 6-10 fit the pairs better than 1-5
    return summary


def assert_reloads_both_ways_with_same_scores(out: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from utils.model import load_reward_model, load_tokenizer
    tok = AutoTokenizer.from_pretrained(out)
    texts = [" Human: What is 2 + 3? Answer with the number only. Assistant: 5",
             " Human: What is 2 + 3? Answer with the number only. Assistant: The answer is 5."]
    batch = tok(texts, return_tensors="pt", padding=True)
    ours = load_reward_model(str(out), load_tokenizer(str(out))).eval()
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits.squeeze(-1), ours.score(batch["input_ids"], batch["attention_mask"]),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("zero_stage,extra", [(0, []), (2, ["--loss", "divergence"]), (3, ["--offload"])])
def test_reward_model_trains_under_zero_stages(tmp_path, zero_stage, extra):
    out = tmp_path / "rm"
    trained(run([*QUICK, "--zero_stage", str(zero_stage), "--output_dir", str(out), *extra]), out)
    assert_reloads_both_ways_with_same_scores(out)


def test_reward_model_with_lora(tmp_path):
    out = tmp_path / "rm_lora"
    trained(run([*QUICK, "--zero_stage", "2", "--lora_dim", "8", "--only_optimize_lora",
                 "--lora_learning_rate", "1e-2", "--output_dir", str(out)]), out)
    from safetensors.torch import load_file
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    assert_reloads_both_ways_with_same_scores(out)


@pytest.mark.slow
def test_reward_model_zero3_two_processes(tmp_path):
    out = tmp_path / "rm_2p"
    proc = run([*QUICK, "--zero_stage", "3", "--output_dir", str(out)],
               launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    assert "2 process(es)" in proc.stdout + proc.stderr
    trained(proc, out)
    assert_reloads_both_ways_with_same_scores(out)


def test_pair_with_equal_answers_is_refused(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    rows[7]["rejected"] = rows[7]["chosen"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run([*QUICK, "--data_path", str(data), "--data_split", "0,1,0", "--output_dir", str(tmp_path / "x")])
    assert_exit(proc, 2)
    assert "equal to the rejected" in proc.stderr.strip().splitlines()[-1]


def test_source_without_rejected_answers_is_refused(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}"}) + "\n" for i in range(40)))
    proc = run([*QUICK, "--data_path", str(data), "--output_dir", str(tmp_path / "x")])
    assert_exit(proc, 2)
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
