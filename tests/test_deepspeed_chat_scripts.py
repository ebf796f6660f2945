"""DeepSpeed-Chat's own single-GPU OPT scripts, flag for flag, run here end to end; and the
LoRA alpha of every step reaching the model's scale.

The flag lists are copied from upstream's applications/DeepSpeed-Chat/training/<step>/
training_scripts/opt/single_gpu/*.sh (its shell variables resolved to their defaults). For the
runs the hub models become the built-in tiny-opt, the hub data the bundled task, the output
folder a temporary one, and a few flags keep them short (SHORT)."""
from __future__ import annotations

import pytest

from tests.helpers import assert_ok, run_module

MODULES = {"step1": "training.step1_supervised_finetuning.main",
           "step2": "training.step2_reward_model_finetuning.main",
           "dpo": "training.step2_dpo_finetuning.main",
           "step3": "training.step3_rlhf_finetuning.main"}
BLEND = "Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets"

UPSTREAM_SCRIPTS = {
    "step1/run_1.3b.sh": (
        "--model_name_or_path facebook/opt-1.3b --gradient_accumulation_steps 8 --lora_dim 128 --zero_stage 0 "
        "--enable_tensorboard --tensorboard_path $OUTPUT --deepspeed --output_dir $OUTPUT"),
    "step1/run_6.7b_lora.sh": (
        f"--data_path {BLEND} --data_split 2,4,4 --model_name_or_path facebook/opt-6.7b "
        "--per_device_train_batch_size 8 --per_device_eval_batch_size 8 --max_seq_len 512 --learning_rate 1e-3 "
        "--weight_decay 0. --num_train_epochs 16 --gradient_accumulation_steps 16 --lr_scheduler_type cosine "
        "--num_warmup_steps 0 --seed 1234 --gradient_checkpointing --zero_stage 0 --lora_dim 128 "
        "--lora_module_name decoder.layers. --deepspeed --output_dir $OUTPUT"),
    "step2/run_350m.sh": (
        "--model_name_or_path facebook/opt-350m --num_padding_at_beginning 1 --weight_decay 0.1 --dropout 0.0 "
        "--gradient_accumulation_steps 4 --zero_stage 0 --enable_tensorboard --tensorboard_path $OUTPUT "
        "--deepspeed --output_dir $OUTPUT"),
    "dpo/run_350m.sh": (
        "--model_name_or_path facebook/opt-350m --weight_decay 0.1 --dropout 0.0 --gradient_accumulation_steps 4 "
        "--zero_stage 0 --enable_tensorboard --tensorboard_path $OUTPUT --deepspeed --output_dir $OUTPUT"),
    "step3/run_1.3b.sh": (
        "--actor_model_name_or_path $ACTOR --critic_model_name_or_path $CRITIC --actor_zero_stage 0 "
        "--critic_zero_stage 0 --num_padding_at_beginning 1 --gradient_accumulation_steps 2 --deepspeed "
        "--actor_lora_dim 128 --enable_hybrid_engine --actor_gradient_checkpointing --actor_dropout 0.0 "
        "--output_dir $OUTPUT"),
    "step3/run_6.7b_lora.sh": (
        "--data_path Dahoas/rm-static --data_split 2,4,4 --actor_model_name_or_path $ACTOR "
        "--critic_model_name_or_path $CRITIC --num_padding_at_beginning 1 --per_device_generation_batch_size 8 "
        "--per_device_training_batch_size 8 --generation_batches 1 --ppo_epochs 1 --max_answer_seq_len 256 "
        "--max_prompt_seq_len 256 --actor_learning_rate 5e-4 --critic_learning_rate 5e-6 --num_train_epochs 1 "
        "--lr_scheduler_type cosine --gradient_accumulation_steps 16 --num_warmup_steps 100 --deepspeed "
        "--seed 1234 --actor_lora_dim 128 --actor_gradient_checkpointing --critic_gradient_checkpointing "
        "--actor_dropout 0.0 --enable_hybrid_engine --output_dir $OUTPUT"),
}
# enough examples for one optimizer step of the largest upstream batch (16 x 8), then stop;
# fp32: faster than bf16 for tiny models on a busy CPU
SHORT = {"step1": ["--num_examples", "800", "--max_steps", "1", "--dtype", "fp32"],
         "step2": ["--num_examples", "400", "--max_steps", "1", "--dtype", "fp32"],
         "dpo": ["--num_examples", "400", "--max_steps", "1", "--dtype", "fp32"],
         "step3": ["--num_examples", "200", "--max_answer_seq_len", "8", "--enable_test_mode", "--test_stop_step", "1",
                   "--dtype", "fp32"]}


def local(flags: str, out) -> list[str]:
    """Upstream's flags with its hub models, hub data and output folder swapped for local ones."""
    args, data = [], False
    for word in flags.replace("$OUTPUT", str(out)).split():
        if word.startswith("--"):
            data = word == "--data_path"
            if data:
                args += ["--data_path", "bundled"]
        if data:
            continue
        args.append("tiny-opt" if word.startswith("facebook/opt-") or word in ("$ACTOR", "$CRITIC") else word)
    return args


def summary(folder):
    import json
    return json.loads((folder / "training_summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("script", UPSTREAM_SCRIPTS)
def test_upstream_single_gpu_script_runs_here(script, tmp_path):
    step = script.split("/")[0]
    out = tmp_path / "out"
    proc = run_module(MODULES[step], [*local(UPSTREAM_SCRIPTS[script], out), *SHORT[step]])
    assert_ok(proc)
    assert "warning:" not in proc.stderr  # every flag these scripts use means something here
    model = out / "actor" if step == "step3" else out
    assert (model / "model.safetensors").is_file()
    assert summary(model)["rounds" if step == "step3" else "steps"] == 1
    if "lora_dim 128" in UPSTREAM_SCRIPTS[script]:  # alpha = rank by default: scale 1
        assert "LoRA: rank 128, alpha 128, update scaled by alpha/rank = 1," in proc.stdout


# ---- LoRA alpha reaches the model's scale in every step ------------------------------------------

ONE_MODEL_RUN = ["--model_name_or_path", "tiny-opt", "--num_examples", "100", "--max_steps", "1",
                 "--max_seq_len", "64", "--dtype", "fp32", "--lora_dim", "4", "--lora_alpha", "1", "--disable_tqdm"]


@pytest.mark.slow
@pytest.mark.parametrize("step", ["step1", "step2", "dpo"])
def test_lora_alpha_sets_the_scale(step, tmp_path):
    proc = run_module(MODULES[step], [*ONE_MODEL_RUN, "--output_dir", tmp_path / "out"])
    assert_ok(proc)
    assert "LoRA: rank 4, alpha 1, update scaled by alpha/rank = 0.25," in proc.stdout  # upstream's 1/r


@pytest.mark.slow
def test_actor_and_critic_lora_alpha_set_their_scales(tmp_path):
    proc = run_module(MODULES["step3"], [
        "--actor_model_name_or_path", "tiny-opt", "--critic_model_name_or_path", "tiny-opt", "--num_examples", "100",
        "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2",
        "--max_prompt_seq_len", "32", "--max_answer_seq_len", "4", "--enable_test_mode", "--test_stop_step", "1",
        "--actor_lora_dim", "4", "--actor_lora_alpha", "1", "--critic_lora_dim", "8", "--critic_lora_alpha", "16",
        "--enable_ema", "--dtype", "fp32", "--disable_tqdm", "--output_dir", tmp_path / "out"])
    assert_ok(proc)
    assert "actor LoRA: rank 4, alpha 1, update scaled by alpha/rank = 0.25," in proc.stdout
    assert "critic LoRA: rank 8, alpha 16, update scaled by alpha/rank = 2," in proc.stdout
