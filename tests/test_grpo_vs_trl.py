"""bench.grpo_vs_trl: the two sides get the same settings, from one set of arguments.

Our Step 3 command line is parsed by Step 3's own parser and TRL's GRPOConfig arguments are built
by the same function the peer uses; every matched quantity is compared. The prompts the peer hands
TRL are checked against the batches our Step 3 loader draws, round by round. None of this needs
trl; the end-to-end run (both sides on tiny-llama) needs a trl 1.16 environment and is skipped
without one (CI installs no trl)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.grpo_vs_trl import (ADAM_BETAS, ADAM_EPS, LOSS_TYPES, build_parser, matched_settings, ours_command,
                               trl_config_kwargs)
from tests.helpers import assert_ok, run_module

REWARD = Path(__file__).parent / "peer_reward_fn.py"
BASE = ["--sft", "tiny-llama", "--reward_fn", f"{REWARD}:bundled_checker", "--num_examples", "600"]


def parsed_ours(argv: list[str]):
    """Our Step 3's config from the benchmark's command line, by Step 3's own parser."""
    from training.step3_rlhf_finetuning.config import Step3Config
    from utils.config import parse_config
    return parse_config(Step3Config, argv)


@pytest.mark.parametrize("extra", [
    [],
    ["--prompts_per_round", "6", "--samples_per_prompt", "3", "--micro_batch", "6", "--rounds", "7",
     "--kl_ctl", "0.1", "--learning_rate", "3e-6", "--temperature", "0.7", "--max_answer_seq_len", "24",
     "--loss_aggregation", "sequence", "--scale_rewards", "none", "--cliprange", "0.3",
     "--lr_scheduler_type", "cosine", "--max_grad_norm", "0.5", "--gradient_checkpointing"],
    ["--loss_aggregation", "token", "--scale_rewards", "batch", "--micro_batch", "8"],
    ["--loss_aggregation", "dr_grpo"],
    ["--ignore_eos", "--max_answer_seq_len", "16"],
])
def test_both_sides_get_every_matched_setting(tmp_path, extra):
    args = build_parser().parse_args([*BASE, *extra, "--output_dir", str(tmp_path)])
    m = matched_settings(args)
    cfg = parsed_ours(ours_command(args, 99, tmp_path / "ours"))
    cfg.validate()
    kw = trl_config_kwargs(m, 99, str(tmp_path / "trl"), use_cpu=True)
    from training.step3_rlhf_finetuning.data import optimizer_steps_per_round

    # the model, its dtype, dropout, checkpointing, seed
    assert cfg.actor_model_name_or_path == m["model"] == "tiny-llama"
    assert cfg.dtype == "fp32" and kw["bf16"] is False and kw["fp16"] is False
    assert cfg.actor.dropout == 0.0 and kw["disable_dropout"] is True
    assert cfg.actor.gradient_checkpointing == kw["gradient_checkpointing"] == m["gradient_checkpointing"]
    assert cfg.seed == kw["seed"] == 99
    # GRPO itself
    assert cfg.ppo.advantage == "grpo"
    assert cfg.generation.samples_per_prompt == kw["num_generations"] == m["samples_per_prompt"]
    assert cfg.generation.max_answer_seq_len == kw["max_completion_length"] == m["max_answer_seq_len"]
    assert cfg.ppo.kl_in_loss and cfg.ppo.kl_ctl == kw["beta"] == m["kl_ctl"]
    assert cfg.ppo.target_kl == 0  # a fixed KL weight, as TRL's beta
    assert cfg.ppo.scale_rewards == kw["scale_rewards"]
    assert LOSS_TYPES[cfg.ppo.loss_aggregation] == kw["loss_type"]
    assert cfg.ppo.cliprange == kw["epsilon"] == kw["epsilon_high"] and cfg.ppo.cliprange_high == 0
    assert cfg.ppo_epochs == kw["num_iterations"] == 1
    assert not cfg.ppo.whiten_advantages and not cfg.ppo.enable_ema
    assert cfg.ppo.clip_reward_value >= 1e6  # TRL does not clip scores
    assert (cfg.generation.temperature, cfg.generation.top_p, cfg.generation.top_k) == (
        kw["temperature"], kw["top_p"], kw["top_k"])
    # eos ends answers on both sides, or (--ignore_eos) on neither: every answer max_answer_seq_len tokens
    assert cfg.generation.ignore_eos == m["ignore_eos"] == ("--ignore_eos" in extra)
    assert kw["generation_kwargs"] == ({"min_new_tokens": kw["max_completion_length"]} if m["ignore_eos"] else None)
    # the same answers per round, micro-batches, one optimizer step a round, the same rounds
    trl_generation_batch = kw["per_device_train_batch_size"] * kw["steps_per_generation"]  # one process
    assert cfg.answers_per_rank == trl_generation_batch == m["prompts_per_round"] * m["samples_per_prompt"]
    assert cfg.per_device_generation_batch_size == trl_generation_batch // kw["num_generations"]
    assert cfg.per_device_training_batch_size == kw["per_device_train_batch_size"]
    assert cfg.gradient_accumulation_steps == kw["gradient_accumulation_steps"]
    assert optimizer_steps_per_round(cfg) == kw["steps_per_generation"] // kw["gradient_accumulation_steps"] == 1
    assert cfg.max_rounds == kw["max_steps"] == m["rounds"]
    assert cfg.max_rounds * cfg.answers_per_rank == kw["max_steps"] * trl_generation_batch == m["answers_seen"]
    # the optimizer and its schedule
    assert cfg.actor.learning_rate == kw["learning_rate"] == m["learning_rate"]
    assert cfg.lr_scheduler_type == kw["lr_scheduler_type"] and cfg.num_warmup_steps == kw["warmup_steps"] == 0
    assert cfg.actor.weight_decay == kw["weight_decay"] == 0.0
    assert cfg.max_grad_norm == kw["max_grad_norm"]
    assert (kw["adam_beta1"], kw["adam_beta2"], kw["adam_epsilon"]) == (*ADAM_BETAS, ADAM_EPS)
    # the data
    assert cfg.data_path == [m["data_path"]] and cfg.data_split == m["data_split"]
    assert cfg.num_examples == m["num_examples"]
    assert cfg.generation.max_prompt_seq_len == m["max_prompt_seq_len"]
    assert kw["shuffle_dataset"] is False  # the peer hands TRL the prompts in our order


def test_our_adamw_is_what_trl_is_told():
    """ADAM_BETAS / ADAM_EPS are what our optimizer really uses (TRL is given them)."""
    import torch

    from utils.strategy.optim import build_optimizer
    defaults = build_optimizer(torch.nn.Linear(2, 2), lr=1e-3, weight_decay=0.0, lora_lr=1e-3, offload=False).defaults
    assert (tuple(defaults["betas"]), defaults["eps"]) == (ADAM_BETAS, ADAM_EPS)


def test_every_loss_aggregation_has_a_trl_loss_type():
    from utils.rl_math import LOSS_AGGREGATIONS
    assert set(LOSS_TYPES) == set(LOSS_AGGREGATIONS)
    assert build_parser().get_default("loss_aggregation") == "dapo"  # TRL 1.16's default loss


def test_a_micro_batch_that_does_not_divide_the_round_is_refused(tmp_path):
    args = build_parser().parse_args([*BASE, "--micro_batch", "5", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="must divide"):
        matched_settings(args)


def test_trl_gets_the_prompts_our_step3_draws_round_by_round(tmp_path):
    """The peer's prompt list (texts checked against our ids) is, round by round, the prompt
    batches our Step 3 loader yields, over an epoch boundary too."""
    import torch.distributed as torch_dist

    from bench.trl_grpo_peer import step3_prompts
    from training.step3_rlhf_finetuning.data import prompt_batches, prompt_loader, total_iterations
    from utils.cli import free_port
    from utils.model import load_tokenizer, resolve_model_path

    args = build_parser().parse_args([*BASE, "--num_examples", "60", "--rounds", "9", "--prompts_per_round", "4",
                                      "--output_dir", str(tmp_path)])
    m = matched_settings(args)
    cfg = parsed_ours(ours_command(args, 5, tmp_path / "ours"))
    tokenizer = load_tokenizer(resolve_model_path("tiny-llama"), padding_side="left")
    texts, ids, columns = step3_prompts(m, 5, str(tmp_path / "data"), tokenizer)
    assert len(texts) == len(ids) == 9 * 4 and all(c == {} for c in columns)  # bundled rows: no extra columns
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        loader, sampler = prompt_loader(cfg, tokenizer)
        assert len(loader) < 9  # the rounds run into a second epoch
        assert total_iterations(cfg, loader)[0] == 9  # and our Step 3 runs them all
        batches = prompt_batches(cfg, loader, sampler, 0)
        ours = []
        for _ in range(9):
            batch = next(batches)
            ours += [row[mask.bool()].tolist() for row, mask in zip(batch["prompt"], batch["prompt_att_mask"])]
    finally:
        torch_dist.destroy_process_group()
    assert ours == ids


def trl_python() -> str | None:
    """A python with trl 1.16, if this machine has one (never installed by the tests)."""
    given = os.environ.get("RLHFKIT_TRL116_PYTHON")
    python = Path(given) if given else Path.home() / ".cache" / "rlhfkit" / "bench-trl-1.16-venv" / "bin" / "python"
    return str(python) if python.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(trl_python() is None, reason="no trl 1.16 environment (python -m bench.grpo_vs_trl creates one)")
def test_both_sides_run_and_are_scored_on_tiny_llama(tmp_path):
    out = tmp_path / "gvt"
    proc = run_module("bench.grpo_vs_trl", [
        *BASE, "--seeds", "3", "--rounds", "2", "--prompts_per_round", "2", "--samples_per_prompt", "2",
        "--max_answer_seq_len", "4", "--max_prompt_seq_len", "64", "--num_prompts", "4",
        "--peer_python", trl_python(), "--output_dir", out], timeout=1200)
    assert_ok(proc)
    result = json.loads((out / "grpo_vs_trl.json").read_text())
    for side in ("ours", "trl"):
        runs = result["runs"][side]
        assert len(runs) == 1 and len(runs[0]["round_s"]) == len(runs[0]["reward"]) == 2
        assert (Path(runs[0]["model"]) / "config.json").is_file()
        assert result["sides"][side]["n"] == 1
    trl = result["runs"]["trl"][0]
    assert trl["trl_version"].startswith("1.16")
    assert trl["reference_model"] and len(trl["eos_token_ids"]) == 1 and trl["gradient_checkpointing"] is False
    assert "ours - TRL" in (out / "grpo_vs_trl.md").read_text()


def test_saved_sides_from_before_a_setting_existed_are_reused_only_with_its_old_value(tmp_path):
    """A side saved before --ignore_eos existed ran with eos on: it is reused without the flag and
    rerun with it (a setting that changed is never taken from an older run); one that counted no
    round's FLOPs is rerun when a count is asked for."""
    from bench.grpo_vs_trl import earlier_run
    args = build_parser().parse_args(["--sft", "tiny-llama", "--reward_fn", "m.py:f", "--output_dir", str(tmp_path)])
    old = {**matched_settings(args), "seed": 3}
    del old["ignore_eos"]
    done = tmp_path / "side.json"
    done.write_text(json.dumps({"settings": old, "model": "x"}))
    assert earlier_run(done, args, 3)["model"] == "x"
    assert earlier_run(done, args, 4) is None
    args.count_round = 2  # a side that counted no round's FLOPs (or another's) is rerun
    assert earlier_run(done, args, 3) is None
    args.count_round = 0
    args.ignore_eos = True
    assert earlier_run(done, args, 3) is None


def test_the_peer_may_run_fewer_seeds_and_the_difference_pairs_prompts_over_seed_means(tmp_path):
    from bench.grpo_vs_trl import paired_difference, side_seeds
    args = build_parser().parse_args(["--sft", "tiny-llama", "--reward_fn", "m.py:f", "--output_dir", str(tmp_path),
                                      "--seeds", "1", "2", "3", "4", "--peer_seeds", "1", "2"])
    assert side_seeds(args, "ours") == [1, 2, 3, 4] and side_seeds(args, "trl") == [1, 2]
    args.peer_seeds = None
    assert side_seeds(args, "trl") == [1, 2, 3, 4]
    # two prompts: ours' four seeds average 0.5 and 1.0 on them, TRL's two 0.0 and 1.0
    d = paired_difference([[0, 1], [1, 1], [0, 1], [1, 1]], [[0, 1], [0, 1]])
    assert d["difference"] == pytest.approx(0.25) and d["difference_se"] == pytest.approx(0.25)
