"""DPO end to end on tiny models: preference accuracy rises, ZeRO-3 with an offloaded reference,
LoRA with the adapters-off reference, two processes, output loads in chat, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import assert_chat_reply_is_greedy, assert_ok, error_line, model_with_other_tokenizer, run_module
from utils.cli import free_port
from utils.metrics import read_jsonl

MODULE = "training.step2_dpo_finetuning.main"
QUICK = ["--model_name_or_path", "tiny-llama", "--num_examples", "800", "--max_seq_len", "64",
         "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
         "--learning_rate", "1e-3", "--dtype", "fp32", "--max_steps", "12", "--disable_tqdm",
         "--log_interval", "6"]


def run(args, launcher=None):
    return run_module(MODULE, [*QUICK, *args], launcher)


def trained(proc, out: Path) -> dict:
    assert_ok(proc)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 12
    logged = [r for r in read_jsonl(out / "logs" / "metrics.jsonl") if "train/loss" in r]
    assert len(logged) == 2
    for key in ("accuracy", "chosen_reward", "rejected_reward"):
        assert f"train/{key}" in logged[0]
    return summary


def assert_preference_learned(summary: dict) -> None:
    # Before training the policy IS the reference: every implicit reward is 0, the loss ln 2.
    assert summary["loss_before"] == pytest.approx(0.6931, abs=1e-3)
    assert summary["accuracy_before"] == 0.0 and summary["margin_before"] == 0.0
    # After: held-out chosen answers are preferred more often than not, by a positive margin.
    assert summary["accuracy_after"] > 0.6, summary
    assert summary["margin_after"] > 0 and summary["loss_after"] < 0.66, summary


def test_dpo_raises_preference_accuracy_and_saves_a_chat_model(tmp_path):
    out = tmp_path / "dpo"
    assert_preference_learned(trained(run(["--output_dir", out]), out))
    assert_chat_reply_is_greedy(out)


def test_dpo_zero3_with_offloaded_reference_and_label_smoothing(tmp_path):
    out = tmp_path / "dpo3"
    summary = trained(run(["--zero_stage", "3", "--offload_reference_model", "--label_smoothing", "0.1",
                           "--output_dir", out]), out)
    assert summary["margin_after"] > 0


def test_dpo_lora_uses_the_adapters_off_model_as_reference(tmp_path):
    out = tmp_path / "dpo_lora"
    proc = run(["--zero_stage", "2", "--lora_dim", "8", "--only_optimize_lora", "--lora_learning_rate",
                "1e-2", "--offload_reference_model", "--output_dir", out])
    assert "reference: LoRA adapters off (--offload_reference_model: nothing to place" in proc.stdout + proc.stderr
    summary = trained(proc, out)
    assert summary["loss_before"] == pytest.approx(0.6931, abs=1e-3) and summary["margin_after"] > 0
    from safetensors.torch import load_file
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))


@pytest.mark.slow
def test_dpo_zero3_two_processes(tmp_path):
    out = tmp_path / "dpo_2p"
    proc = run(["--zero_stage", "3", "--output_dir", out],
               launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    assert "2 process(es)" in proc.stdout + proc.stderr
    assert trained(proc, out)["margin_after"] > 0


def test_reference_with_another_tokenizer_is_refused(tmp_path):
    ref = model_with_other_tokenizer(tmp_path / "ref")
    proc = run(["--ref_model_name_or_path", ref, "--output_dir", tmp_path / "x"])
    assert "tokenizer" in error_line(proc)


@pytest.mark.parametrize("flag,value", [("--beta", "0"), ("--label_smoothing", "0.5")])
def test_out_of_range_dpo_flags_are_refused(tmp_path, flag, value):
    assert error_line(run([flag, value, "--output_dir", tmp_path / "x"])).startswith("error: --")
