"""A seeded configuration matrix for Step 3: model families and sizes x ZeRO stage x dtype x LoRA
x ptx x EMA x advantage x loss aggregation x processes. Each combination trains 3 rounds
(checkpoint each round), then resumes the last round from the round-2 checkpoint in a fresh
folder, and checks, from
inside both runs (tests/step3_matrix.py):
- the LR schedule ends exactly at the last optimizer step (steps taken = scheduler steps = the
  planned total; the cosine LR is 0 there), and the EMA moved once per actor step;
- the EMA equals a hand-computed fp32 EMA of the actor's weights;
- critic-free advantages: prompts whose answers' scores tie get nothing from the scores;
- every saved folder, reloaded through transformers, equals the final weights in its dtype;
- the resumed run ends where the uninterrupted one did.

The full product has thousands of combinations; each CI run takes RLHFKIT_MATRIX_SIZE of them
(default 5), chosen by RLHFKIT_MATRIX_SEED (default: a fresh seed, printed in the test header
and in each test id). Every value of every dimension is used once before any repeats, so a run
of 5 covers all families. Re-run a failure with its seed:
    RLHFKIT_MATRIX_SEED=<seed> python -m pytest tests/test_matrix.py -k '<id>'
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.helpers import assert_ok, run_module
from utils.cli import free_port

DIMENSIONS = {
    "family": ["llama", "gpt_neox", "qwen2", "opt", "gpt2"],
    # h64: 4k-element attention matrices, under ZeRO-3's persistence threshold (kept whole);
    # h256: 262k-element MLP matrices, over DeepSpeed's default threshold of 1e5
    "hidden": [64, 256],
    "zero": [0, 2, 3],
    "dtype": ["fp32", "bf16"],
    "lora": [False, True],
    "ptx": [False, True],
    "ema": [True, False],
    "advantage": ["gae", "rloo", "grpo"],
    "loss": ["token", "sequence", "dr_grpo", "dapo"],  # --loss_aggregation
    "nproc": [1, 2],
    # the built-in reward (critic-free: the checker; gae: the reward model) or --reward_fn
    # (critic-free: the checker as a function; gae: the function and the reward model weighed)
    "reward": ["builtin", "function"],
}
REWARD_FN = ["--reward_fn", "examples/rewards/bundled_math.py:bundled_math_reward"]
SEED = int(os.environ["RLHFKIT_MATRIX_SEED"])  # drawn in conftest.py when not given, printed in the header
SIZE = int(os.environ.get("RLHFKIT_MATRIX_SIZE", "5"))


def combinations(seed: int, size: int) -> list[dict]:
    """`size` combinations: each dimension's values in a seeded random order, cycled, so every
    value appears before any appears twice; dimensions shuffled independently."""
    rng = random.Random(seed)
    columns = {}
    for name, values in DIMENSIONS.items():
        column = []
        while len(column) < size:
            column += rng.sample(values, len(values))
        columns[name] = column[:size]
    return [{name: columns[name][i] for name in DIMENSIONS} for i in range(size)]


def combo_id(combo: dict) -> str:
    flags = [name for name in ("lora", "ptx", "ema") if combo[name]] + ["fn"] * (combo["reward"] == "function")
    return "-".join([f"s{SEED}", f"{combo['family']}-h{combo['hidden']}", f"z{combo['zero']}", combo["dtype"],
                     *flags, combo["advantage"], combo["loss"], f"{combo['nproc']}p"])


def step3_flags(combo: dict) -> list[str]:
    model = f"tiny-{combo['family']}-h{combo['hidden']}"
    flags = ["--actor_model_name_or_path", model, "--critic_model_name_or_path", model,
             "--actor_zero_stage", str(combo["zero"]), "--critic_zero_stage", str(combo["zero"]),
             "--dtype", combo["dtype"], "--num_examples", "600", "--max_prompt_seq_len", "64",
             "--max_answer_seq_len", "6", "--per_device_generation_batch_size", "3", "--generation_batches", "2",
             "--gradient_accumulation_steps", "2", "--num_warmup_steps", "1", "--lr_scheduler_type", "cosine",
             "--actor_learning_rate", "1e-3", "--critic_learning_rate", "1e-3", "--max_rounds", "3",
             "--save_steps", "1", "--save_total_limit", "3", "--disable_tqdm", "--log_interval", "1",
             "--advantage", combo["advantage"], "--loss_aggregation", combo["loss"]]
    fn = combo["reward"] == "function"
    if combo["advantage"] == "gae":  # 6 answers a round, micro-batches of 3, reward model = the tiny model
        flags += ["--per_device_training_batch_size", "3"]
        flags += [*REWARD_FN, "--reward_source", "model", "--reward_weights", "0.5", "1"] if fn else []
    else:  # 12 answers (2 per prompt) scored by the checker (ties: a random model scores 0)
        flags += ["--samples_per_prompt", "2", "--per_device_training_batch_size", "4",
                  *(REWARD_FN if fn else ["--reward_source", "checker"])]
    if combo["lora"]:
        flags += ["--actor_lora_dim", "4", "--only_optimize_lora", "--actor_lora_learning_rate", "1e-3"]
        if combo["advantage"] == "gae":
            flags += ["--critic_lora_dim", "4", "--critic_lora_learning_rate", "1e-3"]
    if combo["ptx"]:
        flags += ["--unsupervised_dataset_name", "bundled", "--unsup_coef", "1.0"]
    if combo["ema"]:
        flags += ["--enable_ema", "--ema_decay", "0.5"]
    return flags


def run(folder: Path, flags: list, nproc: int) -> dict:
    report = folder.with_suffix(".json")
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())] if nproc == 2 else None
    assert_ok(run_module("tests.step3_matrix", ["--report", report, *flags, "--output_dir", folder], launcher))
    return json.loads(report.read_text())


def check(report: dict, combo: dict) -> None:
    planned = report["planned_optimizer_steps"]
    assert planned == 3 * (2 if combo["advantage"] != "gae" else 1)  # rounds x ceil(micro-batches / 2)
    assert report["actor_optimizer_steps"] == report["actor_scheduler_steps"] == planned
    assert report["lr_actor_end"] == pytest.approx(0.0, abs=1e-12)
    if combo["advantage"] == "gae":
        assert report["critic_optimizer_steps"] == report["critic_scheduler_steps"] == planned
    else:
        assert report["tied_max_advantage"] == 0.0 and report["groups"] > 0
    if combo["ema"]:
        assert report["ema_max_error"] < 1e-5
        assert report["ema_updates"] > 0
    assert max(report["reload_max_error"].values()) == 0.0, report["reload_max_error"]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


def test_every_value_of_every_dimension_is_drawn_before_any_repeats():
    combos = combinations(1, 5)
    assert {c["family"] for c in combos} == set(DIMENSIONS["family"])
    for name, values in DIMENSIONS.items():
        assert set(values) <= {c[name] for c in combinations(7, max(map(len, DIMENSIONS.values())))}
    assert combinations(3, 5) == combinations(3, 5)


@pytest.mark.slow
@pytest.mark.parametrize("combo", combinations(SEED, SIZE), ids=combo_id)
def test_step3_combination(tmp_path, combo):
    flags = step3_flags(combo)
    straight = run(tmp_path / "straight", flags, combo["nproc"])
    check(straight, combo)
    resumed = tmp_path / "resumed"  # a fresh folder holding only the round-2 checkpoint
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    again = run(resumed, [*flags, "--resume"], combo["nproc"])
    check(again, combo)
    for folder in ("actor", "actor_ema") if combo["ema"] else ("actor",):
        ends, also = weights(tmp_path / "straight" / folder), weights(resumed / folder)
        for key, value in ends.items():
            tolerance = 1e-5 if combo["dtype"] == "fp32" else 2e-2
            assert (also[key].float() - value.float()).abs().max() <= tolerance, (folder, key)
