"""Step 3 end to end on tiny models: PPO raises a programmatic reward; ZeRO 2/3, LoRA, EMA, ptx,
offloaded reference and reward model, two processes; outputs load for chat; bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import assert_chat_reply_is_greedy, assert_ok, error_line, model_with_other_tokenizer, run_module
from utils.cli import free_port
from utils.metrics import read_jsonl

MODULE = "training.step3_rlhf_finetuning.main"
QUICK = ["--actor_model_name_or_path", "tiny-llama", "--critic_model_name_or_path", "tiny-llama",
         "--num_examples", "600", "--per_device_generation_batch_size", "4",
         "--per_device_training_batch_size", "2", "--max_prompt_seq_len", "32",
         "--max_answer_seq_len", "8", "--num_warmup_steps", "0", "--actor_learning_rate", "1e-3",
         "--critic_learning_rate", "1e-3", "--dtype", "fp32", "--enable_test_mode",
         "--test_stop_step", "2", "--disable_tqdm", "--log_interval", "1"]


def rounds(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "logs" / "metrics.jsonl") if "train/reward" in r]


def finished(proc, out: Path, n_rounds: int = 2, folders=("actor", "critic")) -> list[dict]:
    assert_ok(proc)
    assert "padded forwards" not in proc.stdout + proc.stderr  # tiny-llama's forwards pack (--pack_sequences)
    logged = rounds(out)
    assert len(logged) == n_rounds
    for key in ("reward", "kl", "actor_loss", "critic_loss", "entropy", "answer_len", "generation_s",
                "training_s", "generation_tflops", "scoring_tflops", "training_tflops", "samples_per_s", "flops_per_sample"):
        assert all(f"train/{key}" in r for r in logged), key
    assert logged[0]["train/kl"] == pytest.approx(0.0, abs=1e-4)  # the actor starts as the reference
    assert logged[0]["train/first_policy_shift"] == pytest.approx(0.0, abs=1e-4)  # rollout == update policy
    for folder in folders:
        assert (out / folder / "model.safetensors").is_file()
    return logged


def assert_chats(actor: Path) -> None:
    assert_chat_reply_is_greedy(actor)


def test_ppo_raises_a_programmatic_reward(tmp_path):
    """30 rounds against tests/step3_toy_reward.py's reward (share of answer tokens from a
    half of the vocabulary the policy can reach); sampled at temperature 0.2 so a random tiny
    model has a distribution sharp enough to move in a few dozen updates."""
    out = tmp_path / "toy"
    proc = run_module("tests.step3_toy_reward", [
        *QUICK, "--per_device_generation_batch_size", "8", "--per_device_training_batch_size", "8",
        "--max_answer_seq_len", "4", "--num_examples", "2000", "--test_stop_step", "30",
        "--temperature", "0.2", "--lr_scheduler_type", "constant", "--actor_zero_stage", "2",
        "--critic_zero_stage", "2", "--output_dir", out])
    logged = finished(proc, out, n_rounds=30)
    reward = [r["train/reward"] for r in logged]
    first, last = sum(reward[:5]) / 5, sum(reward[-10:]) / 10
    assert last > first + 0.15, reward


def test_zero3_lora_ema_ptx_and_offloaded_frozen_models(tmp_path):
    out = tmp_path / "z3"
    proc = run_module(MODULE, [*QUICK, "--actor_zero_stage", "3", "--critic_zero_stage", "3",
                               "--actor_lora_dim", "8", "--critic_lora_dim", "8", "--enable_ema",
                               "--unsupervised_dataset_name", "bundled", "--offload_reference_model",
                               "--offload_reward_model", "--output_dir", out])
    logged = finished(proc, out)
    assert all("train/unsup_loss" in r for r in logged)
    assert (out / "actor_ema" / "model.safetensors").is_file()
    from safetensors.torch import load_file
    assert not any("lora" in k for k in load_file(out / "actor" / "model.safetensors"))
    for actor in ("actor", "actor_ema"):
        assert_chats(out / actor)


def test_zero2_plain_generate_whitened_advantages_and_ignored_eos_padded(tmp_path):
    out = tmp_path / "z2"
    logged = finished(run_module(MODULE, [*QUICK, "--actor_zero_stage", "2", "--critic_zero_stage", "2",
                                          "--no-enable_hybrid_engine", "--whiten_advantages", "--ignore_eos",
                                          "--no-pack_sequences", "--output_dir", out]), out)
    for row in logged:  # --ignore_eos: every answer is exactly --max_answer_seq_len tokens
        assert row["train/answer_len"] == 8 and row["train/generated_tokens"] == 4 * 8


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_with_ema(tmp_path, stage):
    out = tmp_path / f"z{stage}_2p"
    proc = run_module(MODULE, [*QUICK, "--actor_zero_stage", str(stage), "--critic_zero_stage", str(stage),
                               "--enable_ema", "--output_dir", out],
                      launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    assert "x 2 process(es)" in proc.stdout + proc.stderr
    finished(proc, out)
    assert_chats(out / "actor_ema")


def test_checker_reward_is_the_ground_truth_score_and_needs_no_reward_model(tmp_path):
    """--reward_source checker: each round's reward is the checker's mean score of its answers,
    the same number as gt_score (a reward model's scores would differ)."""
    out = tmp_path / "checker"
    logged = finished(run_module(MODULE, [*QUICK, "--reward_source", "checker", "--max_prompt_seq_len", "96",
                                          "--output_dir", out]), out)
    for row in logged:
        assert row["train/reward"] == pytest.approx(row["train/gt_score"], abs=1e-6)
        assert 0 <= row["train/reward"] <= 1


def test_critic_free_rloo_over_several_answers_per_prompt(tmp_path):
    """--advantage rloo --samples_per_prompt 2: 4 prompts give 8 answers a round; no critic is
    loaded (its path need not exist), run, trained (loss 0) or saved, nor kept in checkpoints."""
    out = tmp_path / "rloo"
    proc = run_module(MODULE, [*QUICK, "--reward_source", "checker", "--max_prompt_seq_len", "96",
                               "--critic_model_name_or_path", tmp_path / "no-critic-here",
                               "--advantage", "rloo", "--samples_per_prompt", "2", "--output_dir", out])
    logged = finished(proc, out, folders=("actor",))
    assert "rollout rounds of 8 answers" in proc.stdout + proc.stderr and "no critic" in proc.stdout + proc.stderr
    assert all(row["train/critic_loss"] == 0 for row in logged)
    assert not (out / "critic").exists() and not list(out.glob("checkpoints/*/critic"))
    assert all(row["train/training_tflops"] > 0 for row in logged)


def test_recomputed_rollout_log_probs_with_truncated_importance_sampling(tmp_path):
    """--rollout_is_cap 2 (which recomputes): the scoring forward recomputes the old log-probs
    (DeepSpeed-Chat's way), each round logs how far the generation pass's were from them (fp32:
    rounding) and the mean TIS weight (1 when they agree)."""
    out = tmp_path / "tis"
    logged = finished(run_module(MODULE, [*QUICK, "--reward_source", "checker", "--max_prompt_seq_len", "96",
                                          "--advantage", "grpo", "--samples_per_prompt", "2",
                                          "--rollout_is_cap", "2",
                                          "--output_dir", out]), out, folders=("actor",))
    for row in logged:
        assert 0 <= row["train/rollout_logprob_gap"] < 1e-4, row
        assert row["train/rollout_is_weight"] == pytest.approx(1.0, abs=1e-4), row


def test_reward_model_with_another_tokenizer_is_refused(tmp_path):
    critic = model_with_other_tokenizer(tmp_path / "critic")
    proc = run_module(MODULE, [*QUICK, "--critic_model_name_or_path", critic, "--output_dir", tmp_path / "x"])
    assert "different tokenizer" in error_line(proc)


def test_batch_sizes_that_do_not_divide_are_refused(tmp_path):
    proc = run_module(MODULE, [*QUICK, "--per_device_generation_batch_size", "3",
                               "--per_device_training_batch_size", "2", "--output_dir", tmp_path / "x"])
    assert "must divide" in error_line(proc)


def test_long_prompts_are_cut_from_the_left_and_reported_once(tmp_path):
    data = tmp_path / "prompts.jsonl"
    long_prompt = "word " * 80 + "What is 2 + 2?"
    data.write_text("".join(json.dumps({"prompt": f"{i} {long_prompt}", "chosen": "4"}) + "\n" for i in range(40)))
    out = tmp_path / "long"
    proc = run_module(MODULE, [*QUICK, "--data_path", data, "--data_split", "0,0,1", "--test_stop_step", "1",
                               "--output_dir", out])
    assert_ok(proc)
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "longer than 32 tokens" in line]
    assert len(said) == 1 and "cut from the left" in said[0], said


@pytest.mark.parametrize("flags,message", [
    (["--ema_decay", "1.0"], "--ema_decay must be in (0, 1)"),
    (["--only_optimize_lora"], "--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim"),
    (["--ppo_epochs", "0"], "--ppo_epochs must be at least 1"),
    (["--reward_source", "checker", "--data_path", "prompts.jsonl"], "--reward_source checker scores a bundled task family"),
    (["--reward_source", "checker", "--reward_model_name_or_path", "tiny-llama"], "has no use with --reward_source"),
    (["--advantage", "rloo"], "it needs --samples_per_prompt 2 or more"),
    (["--samples_per_prompt", "3", "--per_device_training_batch_size", "8"], "x --samples_per_prompt = 12 answers"),
    (["--reward_source", "checker"], "not a whole bundled task prompt (raise --max_prompt_seq_len)"),  # cut at 32
    (["--scale_rewards", "none"], "--scale_rewards none scales grpo's advantages; --advantage gae has none"),
    (["--cliprange_high", "-0.1"], "--cliprange_high must be >= 0"),
    (["--loss_aggregation", "mean"], "invalid choice: 'mean'"),
    (["--rollout_is_cap", "2", "--no-recompute_rollout_logprobs"], "cannot go with --no-recompute_rollout_logprobs"),
    (["--rollout_is_cap", "-1", "--recompute_rollout_logprobs"], "--rollout_is_cap must be >= 0"),
])
def test_impossible_flag_values_are_refused(tmp_path, flags, message):
    line = error_line(run_module(MODULE, [*QUICK, *flags, "--output_dir", tmp_path / "x"]))
    assert line.startswith("error: ") and message in line
