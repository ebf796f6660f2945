"""DeepSpeed-Chat's flags: every flag of its step 1, 2 (reward model, DPO) and 3 `parse_args`
(current and older releases) and of `deepspeed.add_config_arguments` parses with our step's
config, the renamed ones set their field here, the ones with no use warn once, and no flag is
reached by an abbreviation."""
from __future__ import annotations

import importlib

import pytest

from tests.helpers import error_line, run_module
from utils.config import ConfigError, build_parser, parse_config
from utils.upstream_flags import UPSTREAM_FLAGS

CONFIGS = {"step1": ("training.step1_supervised_finetuning.main", "SFTConfig"),
           "step2": ("training.step2_reward_model_finetuning.main", "RewardConfig"),
           "dpo": ("training.step2_dpo_finetuning.main", "DPOConfig"),
           "step3": ("training.step3_rlhf_finetuning.main", "Step3Config")}

# Flag names (with a sample value; None = a switch) of upstream DeepSpeed-Chat's
# training/<step>/main.py parse_args, over its history on the master branch.
# The one-model steps' parse_args share most flags (upstream copied them from step to step).
ONE_MODEL = {
    "--data_path": "bundled", "--data_split": "2,4,4", "--data_output_path": "/tmp/data_files/",
    "--model_name_or_path": "tiny-opt", "--per_device_train_batch_size": "1", "--per_device_eval_batch_size": "1",
    "--max_seq_len": "1", "--learning_rate": "0.1", "--weight_decay": "0.1", "--num_train_epochs": "1",
    "--gradient_accumulation_steps": "1", "--lr_scheduler_type": "cosine", "--num_warmup_steps": "1",
    "--output_dir": "out", "--seed": "1", "--local_rank": "0", "--gradient_checkpointing": None,
    "--dropout": "0.1", "--offload": None, "--dtype": "bf16", "--zero_stage": "1", "--lora_dim": "1",
    "--lora_module_name": "decoder.layers.", "--only_optimize_lora": None, "--lora_learning_rate": "0.1",
    "--compute_fp32_loss": None, "--enable_tensorboard": None, "--tensorboard_path": "tb", "--add_eot_token": None,
}
UPSTREAM = {
    "step1": {**ONE_MODEL, "--sft_only_data_path": "bundled", "--eot_token": "x", "--print_loss": None,
              "--disable_dropout": None},
    "step2": {**ONE_MODEL, "--num_padding_at_beginning": "1", "--eval_interval": "1", "--eval_iters": "1",
              "--disable_dropout": None},
    "dpo": {**ONE_MODEL, "--beta": "0.1", "--label_smoothing": "0.1", "--offload_reference_model": None,
            "--print_loss": None},
    "step3": {
        "--data_path": "bundled", "--data_split": "2,4,4", "--data_output_path": "/tmp/data_files/",
        "--unsupervised_dataset_name": "bundled", "--unsupervised_dataset_config_name": "x",
        "--unsup_coef": "0.1", "--actor_model_name_or_path": "tiny-opt",
        "--critic_model_name_or_path": "tiny-opt", "--num_padding_at_beginning": "1",
        "--per_device_generation_batch_size": "1", "--per_device_training_batch_size": "1",
        "--generation_batches": "1", "--ppo_epochs": "1", "--max_prompt_seq_len": "1",
        "--max_answer_seq_len": "1", "--actor_learning_rate": "0.1", "--critic_learning_rate": "0.1",
        "--actor_weight_decay": "0.1", "--critic_weight_decay": "0.1", "--num_train_epochs": "1",
        "--lr_scheduler_type": "cosine", "--gradient_accumulation_steps": "1", "--num_warmup_steps": "1",
        "--output_dir": "out", "--seed": "1", "--preprocessing_num_workers": "1", "--local_rank": "0",
        "--enable_hybrid_engine": None, "--unpin_actor_parameters": None, "--release_inference_cache": None,
        "--inference_tp_size": "1", "--tp_gather_partition_size": "1", "--offload": None, "--dtype": "bf16",
        "--offload_reference_model": None, "--offload_reward_model": None, "--actor_zero_stage": "1",
        "--critic_zero_stage": "1", "--actor_gradient_checkpointing": None,
        "--critic_gradient_checkpointing": None, "--actor_dropout": "0.1", "--critic_dropout": "0.1",
        "--actor_lora_dim": "1", "--actor_lora_module_name": "decoder.layers.", "--critic_lora_dim": "1",
        "--critic_lora_module_name": "decoder.layers.", "--only_optimize_lora": None,
        "--actor_lora_learning_rate": "0.1", "--critic_lora_learning_rate": "0.1", "--enable_ema": None,
        "--enable_mixed_precision_lora": None, "--compute_fp32_loss": None, "--enable_tensorboard": None,
        "--tensorboard_path": "tb", "--add_eot_token": None, "--align_overflow": None,
        "--print_answers": None, "--print_answers_interval": "1", "--enable_test_mode": None,
        "--test_stop_step": "1", "--disable_actor_dropout": None, "--disable_critic_dropout": None,
        "--per_device_train_batch_size": "1", "--per_device_mini_train_batch_size": "1",
        "--generation_batch_numbers": "1",
    },
}
# deepspeed.add_config_arguments adds these to every upstream script (--deepspeed_mpi in older DeepSpeed)
DEEPSPEED_CORE = {"--deepspeed": None, "--deepspeed_config": "ds.json", "--deepscale": None,
                  "--deepscale_config": "ds.json", "--deepspeed_mpi": None}


def config(step: str):
    module, name = CONFIGS[step]
    return getattr(importlib.import_module(module), name)


def argv(flags: dict) -> list[str]:
    out = []
    for name, value in flags.items():
        out += [name] if value is None else [name, value]
    return out


@pytest.mark.parametrize("step", CONFIGS)
def test_every_upstream_flag_of_the_step_parses(step):
    build_parser(config(step)).parse_args(argv({**UPSTREAM[step], **DEEPSPEED_CORE}))  # exits on an unknown flag


@pytest.mark.parametrize("flag", UPSTREAM_FLAGS, ids=lambda f: f.name)
def test_every_flag_of_the_alias_table_parses_in_its_steps(flag):
    for step in flag.steps:
        ns = build_parser(config(step)).parse_args([flag.name] if flag.value is None else [flag.name, "7"])
        if flag.to:
            assert getattr(ns, flag.to) == (flag.const if flag.value is None else flag.value("7")), step


def test_deepspeed_is_accepted_and_not_read_as_deepspeed_config():
    from training.step1_supervised_finetuning.main import SFTConfig
    cfg = parse_config(SFTConfig, ["--deepspeed", "--zero_stage", "2"])
    assert cfg.deepspeed_config == "" and cfg.zero_stage == 2


def test_renamed_flags_set_their_field_here():
    from training.step1_supervised_finetuning.main import SFTConfig
    from training.step3_rlhf_finetuning.main import Step3Config
    cfg = parse_config(SFTConfig, ["--disable_dropout", "--deepscale_config", "ds.json"])
    assert cfg.dropout == 0.0 and cfg.deepspeed_config == "ds.json"
    cfg = parse_config(Step3Config, ["--per_device_train_batch_size", "8", "--per_device_mini_train_batch_size", "4",
                                     "--generation_batch_numbers", "2", "--disable_critic_dropout",
                                     "--critic_dropout", "0.3", "--disable_actor_dropout"])
    assert (cfg.per_device_generation_batch_size, cfg.per_device_training_batch_size, cfg.generation_batches) == (8, 4, 2)
    assert cfg.critic.dropout == 0.3 and cfg.actor.dropout == 0.0  # the later flag wins, as in argparse


def test_a_flag_of_another_upstream_step_is_still_refused():
    from training.step1_supervised_finetuning.main import SFTConfig
    with pytest.raises(ConfigError, match="unrecognized arguments: --align_overflow"):
        parse_config(SFTConfig, ["--align_overflow"], exit_on_error=False)


def test_ignored_flags_warn_once_on_rank_zero_only(capsys, monkeypatch):
    from training.step3_rlhf_finetuning.main import Step3Config
    flags = ["--align_overflow", "--align-overflow", "--enable_mixed_precision_lora", "--deepspeed",
             "--per_device_mini_train_batch_size", "16"]
    monkeypatch.setenv("RANK", "0")
    parse_config(Step3Config, flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: --") for line in lines), lines
    assert "--align_overflow" in lines[0] and "--enable_mixed_precision_lora" in lines[1]
    monkeypatch.setenv("RANK", "1")
    parse_config(Step3Config, flags)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    parse_config(Step3Config, flags, warn=False)  # train.py checking the flags before the run
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args, line", [
    (["--deepspeed_conf", "x"], "error: unrecognized arguments: --deepspeed_conf x (see --help)"),
    (["--learning_r", "1e-5"], "error: unrecognized arguments: --learning_r 1e-5 (see --help)"),
])
def test_an_abbreviated_flag_is_refused_in_one_line(args, line):
    proc = run_module("training.step1_supervised_finetuning.main", args)
    assert error_line(proc) == line and len(proc.stderr.strip().splitlines()) == 1


def test_train_py_refuses_an_abbreviated_flag_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT
    proc = subprocess.run([sys.executable, "train.py", "--actor-mod", "tiny-opt", "--output-dir", tmp_path / "run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert error_line(proc) == "error: unrecognized arguments: --actor-mod tiny-opt (see --help)"


ABBREVIATED = {  # the required flags in full, one optional flag abbreviated
    "chat": ["--path", "x", "--max_new", "3"],
    "inference.prompt_eval": ["--model_name_or_path_baseline", "a", "--model_name_or_path_finetune", "b",
                              "--num_prom", "3"],
    "training.step2_reward_model_finetuning.rw_eval": ["--model_name_or_path", "x", "--batch", "3"],
}


@pytest.mark.parametrize("module", ABBREVIATED)
def test_other_entry_points_refuse_abbreviations(module):
    proc = run_module(module, ABBREVIATED[module])
    assert proc.returncode == 2 and "unrecognized arguments: " + " ".join(ABBREVIATED[module][-2:]) in proc.stderr
