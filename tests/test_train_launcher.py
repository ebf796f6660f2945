"""train.py: the quick preset through all three steps, then chat and prompt_eval on its outputs,
Step 3 alone on earlier outputs, --resume, and the refusals that must come before any work."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (ROOT, assert_ok, describe, ended_early, error_line, logged_rows, model_with_other_tokenizer,
                           run_module, session_rng)
from utils import checkpoint

STEP_FOLDERS = ("step1_sft", "step2_reward", "step3_rlhf")


def launch(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


# checkpoints and per-step logs so that test_sigkill_across_steps_then_resume_matches can compare
QUICK = ("--preset", "quick", "--step1-args", "--max_steps 8 --save_steps 3 --log_interval 1 --disable_tqdm",
         "--step2-args", "--max_steps 6 --save_steps 2 --log_interval 1 --disable_tqdm",
         "--step3-args", "--max_rounds 3 --save_steps 1 --disable_tqdm")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One quick run of steps 1-3 in one process, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    proc = launch(*QUICK, "--output-dir", out)
    assert_ok(proc)
    return out, proc


def summary(folder: Path) -> dict:
    return json.loads((folder / "training_summary.json").read_text())


def test_quick_preset_runs_all_steps_through_deepspeed_launcher(pipeline):
    out, proc = pipeline
    for module in ("step1_supervised_finetuning", "step2_reward_model_finetuning", "step3_rlhf_finetuning"):
        assert f"--module training.{module}.main" in proc.stdout
    assert proc.stdout.count("deepspeed") >= 3
    # each step starts from the previous one's output
    assert f"--model_name_or_path {out / 'step1_sft'}" in proc.stdout  # Step 2 from Step 1
    assert f"--actor_model_name_or_path {out / 'step1_sft'}" in proc.stdout
    assert f"--critic_model_name_or_path {out / 'step2_reward'}" in proc.stdout
    assert summary(out / "step1_sft")["steps"] == 8
    assert summary(out / "step2_reward")["steps"] == 6
    step3 = summary(out / "step3_rlhf" / "actor")
    assert step3["rounds"] == 3 and 0 <= step3["gt_score_last"] <= 1  # checker score of the rollouts
    for folder in STEP_FOLDERS:  # logs kept in each step's folder, nothing left beside them
        assert "done" in (out / folder / "logs" / "console.log").read_text()
        assert not (out / f"{folder}.log").exists()
    for step in (1, 2, 3):
        assert f"==> step {step} done in" in proc.stdout
    assert "==> recipe: quick (--preset" in proc.stdout and proc.stdout.count("(quick recipe)") == 6  # 3 + summary
    assert "recipe quick" in proc.stdout.split("==> pipeline done in")[1]
    assert "perplexity" in proc.stdout and "accuracy" in proc.stdout and "reward" in proc.stdout
    assert f"python chat.py --path {out / 'step3_rlhf' / 'actor'}" in proc.stdout


def test_second_run_into_the_same_folder_is_refused_before_work(pipeline):
    out, _ = pipeline
    before = (out / "step1_sft" / "model.safetensors").stat().st_mtime_ns
    proc = launch("--preset", "quick", "--output-dir", out)
    assert "already holds a run" in error_line(proc) and "deepspeed" not in proc.stdout
    assert (out / "step1_sft" / "model.safetensors").stat().st_mtime_ns == before


def test_resume_skips_finished_steps(pipeline):
    out, _ = pipeline
    proc = launch("--preset", "quick", "--output-dir", out, "--resume")
    assert_ok(proc)
    assert proc.stdout.count("(--resume), skipped") == 3 and "--module" not in proc.stdout


# what each step logs per step/round, compared between a killed-and-resumed and a straight run
LOGGED = {"step1_sft": ("train/loss",), "step2_reward": ("train/loss",),
          "step3_rlhf": ("train/reward", "train/kl", "train/actor_loss", "train/critic_loss")}


def logged(folder: Path) -> dict[int, tuple]:
    rows = logged_rows(folder / "logs" / "metrics.jsonl")  # complete lines: a running step may be writing
    keys = LOGGED[folder.name]
    return {r["step"]: tuple(r[k] for k in keys) for r in rows if keys[0] in r}


def kill_when_logged(proc: subprocess.Popen, folder: Path, step: int, timeout: float = 600) -> None:
    """SIGKILL the whole launch (train.py, the deepspeed launcher, the step) once `folder` has
    logged `step`: a preempted job, nobody gets to save."""
    deadline = time.time() + timeout
    while max(logged(folder), default=0) < step:
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise ended_early(proc, f"{folder.name} step {step} not logged before the run ended or {timeout}s passed")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


@pytest.mark.slow
def test_sigkill_across_steps_then_resume_matches(pipeline, tmp_path):
    """Killed at a random step of a random step of the pipeline, `train.py --resume` skips the
    finished steps, continues the killed one from its checkpoint and runs the rest: every step
    logs what the uninterrupted run logged."""
    straight, _ = pipeline
    rng, seed = session_rng("test_sigkill_across_steps_then_resume_matches")
    # at least two steps (Step 3: one round) before the step's end, so the kill lands inside it
    folder, step = rng.choice([("step1_sft", rng.randint(4, 6)), ("step2_reward", rng.randint(3, 4)),
                               ("step3_rlhf", 2)])
    where = f"killed once {folder} logged step {step} ({seed})"
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *QUICK, "--output-dir", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    kill_when_logged(proc, out / folder, step)
    # read what the run left once it is dead: it may have logged and saved more since the poll
    last, saved = max(logged(out / folder)), checkpoint.latest(out / folder)
    where += f"; after the kill: newest logged step {last}, newest checkpoint {saved and saved.name}"
    assert last < max(logged(straight / folder)), f"the step ended before the kill: {where}"
    assert not (out / folder / "training_summary.json").exists() and not (out / folder / "actor").exists(), where
    assert saved is not None, where
    proc = launch(*QUICK, "--output-dir", out, "--resume")
    assert_ok(proc)
    killed = STEP_FOLDERS.index(folder)
    assert proc.stdout.count("(--resume), skipped") == killed, where
    assert f"resumed from {saved} " in (out / folder / "logs" / "console.log").read_text(), where
    for name in STEP_FOLDERS:
        want = logged(straight / name)
        steps = [r["step"] for r in logged_rows(out / name / "logs" / "metrics.jsonl") if LOGGED[name][0] in r]
        assert steps == sorted(want), (name, where)  # each step logged once, none lost
        got = logged(out / name)
        for n, values in want.items():
            assert got[n] == pytest.approx(values, rel=1e-3, abs=1e-4), (name, n, where)


@pytest.mark.parametrize("model", ["actor", "actor_ema"])
def test_chat_on_step3_outputs(pipeline, model):
    out, _ = pipeline
    script = "What is 2 plus 3? Answer with the number only.\nIs 7 odd?\nclear\nAnd 4 + 4?\nquit\n"
    proc = subprocess.run([sys.executable, "chat.py", "--path", out / "step3_rlhf" / model,
                           "--max_new_tokens", "4"], cwd=ROOT, input=script, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert_ok(proc)
    assert proc.stdout.count("Assistant: ") == 3 and "(history cleared)" in proc.stdout


def test_prompt_eval_on_two_saved_models(pipeline, tmp_path):
    out, _ = pipeline
    report = tmp_path / "eval.json"
    proc = run_module("inference.prompt_eval", [
        "--model_name_or_path_baseline", out / "step1_sft",
        "--model_name_or_path_finetune", out / "step3_rlhf" / "actor",
        "--num_prompts", 6, "--max_new_tokens", 6, "--output_json", report])
    assert_ok(proc)
    rows = json.loads(report.read_text())
    assert len(rows["prompts"]) == 6 and [m["name"] for m in rows["models"]] == [
        str(out / "step1_sft"), str(out / "step3_rlhf" / "actor")]
    for model in rows["models"]:
        assert len(model["answers"]) == 6 and all(s in (0.0, 0.5, 1.0) for s in model["scores"])
        assert model["mean_score"] == pytest.approx(sum(model["scores"]) / 6)
    assert proc.stdout.count("==> prompt ") == 6 and "mean ground-truth score on 6 prompts" in proc.stdout


def test_step3_alone_reuses_earlier_outputs(pipeline, tmp_path):
    out, _ = pipeline
    run = tmp_path / "run"
    run.mkdir()
    for folder in ("step1_sft", "step2_reward"):
        (run / folder).symlink_to(out / folder, target_is_directory=True)
    proc = launch("--preset", "quick", "--step", 3, "--output-dir", run,
                  "--step3-args", "--max_rounds 1 --disable_tqdm")
    assert_ok(proc)
    assert "--module training.step1" not in proc.stdout and "--module training.step2" not in proc.stdout
    assert f"--actor_model_name_or_path {run / 'step1_sft'}" in proc.stdout
    assert f"--critic_model_name_or_path {run / 'step2_reward'}" in proc.stdout
    assert summary(run / "step3_rlhf" / "actor")["rounds"] == 1


def test_failed_step_stops_the_pipeline_with_its_error_and_log(tmp_path):
    out = tmp_path / "run"
    proc = launch("--preset", "quick", "--output-dir", out, "--step1-args", f"--data_path {tmp_path / 'none.jsonl'}")
    assert proc.returncode != 0, describe(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 1 failed") and "none.jsonl" in last
    assert f"log: {out / 'step1_sft.log'}" in last and (out / "step1_sft.log").is_file()
    assert "--module training.step2" not in proc.stdout


@pytest.mark.slow
def test_quick_preset_with_two_processes(tmp_path):
    out = tmp_path / "run"
    proc = launch(*QUICK, "--output-dir", out, "--num-gpus", 2)
    assert_ok(proc)
    assert "--num_gpus 2" in proc.stdout and "2 process(es)" in proc.stdout
    assert summary(out / "step3_rlhf" / "actor")["rounds"] == 3


@pytest.mark.slow
def test_hostfile_goes_through_the_deepspeed_launcher(tmp_path):
    """A one-host hostfile: the launcher's multi-node path, minus ssh (no other machine here)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    proc = launch("--preset", "quick", "--step", 1, "--output-dir", out, "--hostfile", hostfile,
                  "--launcher-args", "--no_ssh_check --master_addr 127.0.0.1",
                  "--step1-args", "--max_steps 4 --disable_tqdm")
    assert_ok(proc)
    assert f"--hostfile {hostfile}" in proc.stdout and "2 process(es)" in proc.stdout
    assert summary(out / "step1_sft")["steps"] == 4


@pytest.mark.parametrize("args, message", [
    (["--step", "7"], "error: --step 7 does not exist"),
    (["--step", "3", "1"], "list each step once, in order"),
    (["--hostfile", "/no/such/hostfile"], "--hostfile /no/such/hostfile does not exist"),
    (["--num-gpus", "2", "--deployment-type", "single_gpu"], "single_gpu runs one process"),
    (["--deployment-type", "multi_node"], "multi_node needs --hostfile"),
    (["--step2-args", "--bogus_flag 1"], "Step 2 flags: unrecognized arguments: --bogus_flag"),
    (["--step1-args", "--output_dir elsewhere"], "--output_dir is set by train.py"),
    (["--overwrite", "--resume"], "contradict"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, args, message):
    out = tmp_path / "run"
    proc = launch("--preset", "quick", "--output-dir", out, *args)
    assert message in error_line(proc)
    assert not out.exists()


def test_step3_without_a_reward_model_is_refused(tmp_path):
    proc = launch("--preset", "quick", "--step", 3, "--output-dir", tmp_path / "run")
    assert "Step 3 needs a trained reward model" in error_line(proc)


def test_reward_functions_run_steps_1_and_3_without_a_reward_model(tmp_path):
    """README's `--reward-fn` command on the quick preset: Step 1, then Step 3 rewarded by the
    constraints family's example function (no Step 2); its logged reward is the function's."""
    out = tmp_path / "run"
    proc = launch("--preset", "quick", "--data-path", "bundled-constraints", "--output-dir", out,
                  "--reward-fn", "examples/rewards/constraints.py:constraints_reward", "--step1-args", "--max_steps 4",
                  "--step3-args", "--advantage grpo --samples_per_prompt 2 --max_rounds 2 --disable_tqdm")
    assert_ok(proc)
    assert not (out / "step2_reward").exists() and "step2_reward_model_finetuning" not in proc.stdout
    rows = [r for r in logged_rows(out / "step3_rlhf" / "logs" / "metrics.jsonl") if "train/reward" in r]
    assert len(rows) == 2
    for row in rows:  # one function, weight 1: the reward is its score, the ground truth the same checker
        assert row["train/reward"] == pytest.approx(row["train/reward_constraints_reward"])
        assert row["train/reward"] == pytest.approx(row["train/gt_score"], abs=1e-6)


def test_reward_model_with_another_tokenizer_is_refused_before_step1(tmp_path):
    other = model_with_other_tokenizer(tmp_path / "other")
    out = tmp_path / "run"
    proc = launch("--preset", "quick", "--output-dir", out, "--reward-model", other)
    line = error_line(proc)
    assert "different tokenizer" in line and str(other) in line
    assert not out.exists() and "--module" not in proc.stdout


# ---- the plan: which steps run, from which models (in-process, no training) -------------------

def plan_for(*argv):
    import train
    args = train.parse_args([str(a) for a in argv])
    return args, train.make_plan(args)


def finished(folder: Path, model: str = "") -> None:
    (folder / model).mkdir(parents=True)
    (folder / model / "training_summary.json").write_text("{}")


def test_plan_chains_each_step_to_the_previous_output(tmp_path):
    _, plan = plan_for("--output-dir", tmp_path, "--actor-model", "tiny-opt")
    assert plan.run == [1, 2, 3]
    assert plan.models[1] == {"--model_name_or_path": "tiny-opt"}
    assert plan.models[2] == {"--model_name_or_path": str(tmp_path / "step1_sft")}
    assert plan.models[3] == {"--actor_model_name_or_path": str(tmp_path / "step1_sft"),
                              "--critic_model_name_or_path": str(tmp_path / "step2_reward")}


def test_plan_with_a_reward_model_and_without_step1(tmp_path):
    _, plan = plan_for("--output-dir", tmp_path, "--step", 2, 3, "--actor-model", "tiny-opt",
                       "--reward-model", "tiny-opt-350")
    assert plan.models[2] == {"--model_name_or_path": "tiny-opt-350"}
    assert plan.models[3]["--actor_model_name_or_path"] == "tiny-opt"  # no Step 1 output: the model itself


def test_plan_with_reward_functions_skips_step2_and_starts_the_critic_from_sft(tmp_path):
    import train
    spec = "examples/rewards/constraints.py:constraints_reward"
    args, plan = plan_for("--output-dir", tmp_path, "--preset", "quick", "--reward-fn", spec)
    assert plan.run == [1, 3]  # no reward model to train
    sft = str(tmp_path / "step1_sft")
    assert plan.models[3] == {"--actor_model_name_or_path": sft, "--critic_model_name_or_path": sft}
    flags = train.step_flags(3, args, plan)
    assert flags[flags.index("--reward_fn") + 1] == spec
    # with a reward model too (Step 2 run here, or --reward-model), both score the answers
    _, plan = plan_for("--output-dir", tmp_path, "--preset", "quick", "--step", 1, 2, 3, "--reward-fn", spec)
    assert plan.models[3]["--reward_model_name_or_path"] == str(tmp_path / "step2_reward")
    _, plan = plan_for("--output-dir", tmp_path, "--preset", "quick", "--step", 3,
                       "--step3-args", f"--reward_fn {spec}")
    assert "--reward_model_name_or_path" not in plan.models[3]  # Step 3 alone, no reward model anywhere


def test_resume_plans_only_unfinished_steps(tmp_path):
    finished(tmp_path / "step1_sft")
    finished(tmp_path / "step2_reward")
    (tmp_path / "step3_rlhf" / "logs").mkdir(parents=True)  # a Step 3 that died
    import train
    args, plan = plan_for("--output-dir", tmp_path, "--resume", "--preset", "quick")
    assert plan.run == [3]
    flags = train.step_flags(3, args, plan)
    assert "--resume" in flags and "--overwrite_output_dir" not in flags  # from its checkpoint, if any


def test_resume_continues_an_unfinished_step2_from_its_checkpoints(tmp_path):
    finished(tmp_path / "step1_sft")
    (tmp_path / "step2_reward" / "checkpoints").mkdir(parents=True)  # a Step 2 that died
    import train
    args, plan = plan_for("--output-dir", tmp_path, "--resume", "--preset", "quick")
    assert plan.run == [2, 3]
    flags = train.step_flags(2, args, plan)
    assert "--resume" in flags and "--overwrite_output_dir" not in flags


def test_step_flags_put_the_users_flags_last(tmp_path):
    import train
    args, plan = plan_for("--output-dir", tmp_path, "--preset", "quick", "--step2-args", "--learning_rate 7e-4")
    flags = train.step_flags(2, args, plan)
    assert flags[-2:] == ["--learning_rate", "7e-4"] and flags.index("--learning_rate") < len(flags) - 2
    assert flags[flags.index("--zero_stage") + 1] == "2" and flags[flags.index("--output_dir") + 1] == str(
        tmp_path / "step2_reward")


@pytest.mark.slow
def test_quality_bench_on_the_pipelines_models(pipeline, tmp_path):
    """bench.quality end to end on the quick run's Step 1/2 models: every model scored by the
    checker, the tables and the curves written."""
    out, _ = pipeline
    proc = run_module("bench.quality", [
        "--preset", "quick", "--sft", out / "step1_sft", "--reward", out / "step2_reward", "--seeds", 7,
        "--rounds", 1, "--num_prompts", 4, "--max_new_tokens", 4, "--step3_args", "--log_interval 1",
        "--output_dir", tmp_path])
    assert_ok(proc)
    result = json.loads((tmp_path / "quality.json").read_text())
    assert set(result["scores"]) == {"base", "sft", "ppo_seed7", "ppo_seed7_ema", "ppo_seed7_ptx", "dpo"}
    assert all(0 <= v <= 1 for v in result["scores"].values())
    assert result["step3"]["step3_seed7"]["rounds"] == 1 and "verdict" in result
    assert (tmp_path / "quality.md").is_file() and (tmp_path / "quality_curves.png").stat().st_size > 0


def assert_groups_follow_per_prompt(result: dict) -> None:
    """quality.json's per-group numbers, computed again by hand from its per-prompt scores: each
    model's score is its prompts' mean; a group's gain over SFT is the mean over prompts of (the
    seeds' mean score - SFT's), its standard error the sample standard deviation of those
    differences over sqrt(prompts)."""
    per_prompt, seeds = result["per_prompt"], result["seeds"]
    sft = per_prompt["sft"]
    for name, score in result["scores"].items():
        assert score == pytest.approx(sum(per_prompt[name]) / len(per_prompt[name]), abs=1e-12), name
    for kind, suffix in (("PPO actor", ""), ("PPO EMA actor", "_ema")):
        columns = [per_prompt[f"ppo_seed{seed}{suffix}"] for seed in seeds]
        diffs = [sum(column[i] for column in columns) / len(columns) - sft[i] for i in range(len(sft))]
        n = len(diffs)
        gain = sum(diffs) / n
        se = (sum((d - gain) ** 2 for d in diffs) / (n - 1)) ** 0.5 / n ** 0.5
        group = result["groups"][kind]
        assert group["gain"] == pytest.approx(gain, abs=1e-12), (kind, diffs, group)
        assert group["gain_se"] == pytest.approx(se, abs=1e-12), (kind, diffs, group)


@pytest.mark.slow
def test_quality_bench_with_the_checker_as_reward(pipeline, tmp_path):
    """--reward checker: no reward model trained or loaded, Step 3 (here critic-free RLOO) per seed,
    each seed's gain over SFT with its standard error over prompts."""
    out, _ = pipeline
    proc = run_module("bench.quality", [
        "--preset", "quick", "--sft", out / "step1_sft", "--reward", "checker", "--skip", "ptx", "dpo",
        "--seeds", 7, 8, "--jobs", 2, "--rounds", 1, "--num_prompts", 4, "--max_new_tokens", 4,
        "--step3_args", "--advantage rloo --samples_per_prompt 2 --temperature 0.6", "--output_dir", tmp_path])
    assert_ok(proc)
    result = json.loads((tmp_path / "quality.json").read_text())
    assert set(result["scores"]) == {"base", "sft", "ppo_seed7", "ppo_seed7_ema", "ppo_seed8", "ppo_seed8_ema"}
    assert result["other"]["reward used by Step 3"] == "checker" and not (tmp_path / "step2_reward").exists()
    assert result["groups"]["PPO EMA actor"]["n"] == 2
    assert_groups_follow_per_prompt(result)
    assert result["step3"]["step3_seed8"]["rounds"] == 1
    per_prompt, by_task = result["per_prompt"], result["by_task"]
    assert len(per_prompt["tasks"]) == len(per_prompt["ppo_seed8_ema"]) == 4
    assert sum(row["n"] for row in by_task.values()) == 4 and set(by_task) == set(per_prompt["tasks"])
    assert "| task | prompts | base | SFT | PPO actor | PPO EMA actor |" in (tmp_path / "quality.md").read_text()


# ---- recipes (presets): which one runs, and the flags it gives each step (no training) ---------

def parsed_step(step: int, args, plan):
    """The step's config as the step itself would parse the flags train.py builds for it."""
    import importlib

    import train
    from utils.config import parse_config
    meta = train.STEPS[step]
    config_cls = getattr(importlib.import_module(meta.module), meta.config)
    return parse_config(config_cls, train.step_flags(step, args, plan), exit_on_error=False, warn=False)


def test_a_named_actor_model_gets_deepspeed_chats_recipe(tmp_path):
    import train
    args, plan = plan_for("--output-dir", tmp_path, "--actor-model", "tiny-opt", "--reward-model", "tiny-opt",
                          "--num-gpus", 8)
    assert args.preset == "deepspeed-chat"
    blend = ["Dahoas/rm-static", "Dahoas/full-hh-rlhf", "Dahoas/synthetic-instruct-gptj-pairwise",
             "yitingxie/rlhf-reward-datasets"]
    sft, reward, ppo = (parsed_step(s, args, plan) for s in (1, 2, 3))
    assert (sft.data_path, sft.data_split, sft.max_seq_len, sft.max_steps, sft.num_examples) == (blend, "2,4,4", 512, 0, 0)
    assert (sft.learning_rate, sft.weight_decay, sft.num_warmup_steps, sft.per_device_train_batch_size) == (9.65e-6, 0, 0, 8)
    assert sft.num_train_epochs == 1 and sft.dtype == "auto"  # one epoch per step (upstream's single_node: 16)
    assert (reward.data_path, reward.max_seq_len, reward.learning_rate, reward.weight_decay) == (blend, 512, 5e-5, 0.1)
    assert (reward.per_device_train_batch_size, reward.num_train_epochs, reward.dropout, reward.dtype) == (4, 1, 0.0, "auto")
    assert ppo.data_path == ["Dahoas/rm-static"] and (ppo.generation.max_prompt_seq_len, ppo.generation.max_answer_seq_len) == (256, 256)
    assert (ppo.per_device_generation_batch_size, ppo.per_device_training_batch_size, ppo.num_train_epochs) == (4, 4, 1)
    assert (ppo.actor.learning_rate, ppo.critic.learning_rate, ppo.num_warmup_steps) == (9.65e-6, 5e-6, 100)
    assert ppo.max_rounds == 0 and ppo.ppo.enable_ema and ppo.hybrid.enable_hybrid_engine and ppo.dtype == "auto"
    assert plan.models[1] == {"--model_name_or_path": "tiny-opt"}
    flags = train.step_flags(3, args, plan)
    assert flags.count("--data_path") == 1  # Step 3's own prompt data replaces the blend, not appended


def test_without_a_model_the_demo_runs_and_an_explicit_preset_always_wins(tmp_path):
    args, plan = plan_for("--output-dir", tmp_path)
    assert args.preset == "default" and plan.models[1] == {"--model_name_or_path": "smollm2-135m"}
    assert parsed_step(1, args, plan).max_steps == 60
    args, _ = plan_for("--output-dir", tmp_path, "--actor-model", "tiny-opt", "--preset", "quick")
    assert args.preset == "quick"
    args, _ = plan_for("--output-dir", tmp_path, "--reward-model", "tiny-opt")  # the actor is still the demo's
    assert args.preset == "default"


def test_deepspeed_chat_preset_by_name_starts_from_its_models(tmp_path):
    args, plan = plan_for("--output-dir", tmp_path, "--preset", "deepspeed-chat")
    assert plan.models[1] == {"--model_name_or_path": "facebook/opt-1.3b"}
    assert plan.models[2] == {"--model_name_or_path": "facebook/opt-350m"}  # as upstream's e2e_rlhf.py
    _, plan = plan_for("--output-dir", tmp_path, "--preset", "deepspeed-chat", "--actor-model", "tiny-opt")
    assert plan.models[2] == {"--model_name_or_path": str(tmp_path / "step1_sft")}  # 350m would not fit tiny-opt


@pytest.mark.parametrize("preset", ["default", "quick", "deepspeed-chat"])
def test_data_path_sets_the_data_of_every_step(tmp_path, preset):
    import train
    data = ["bundled", str(tmp_path / "mine.jsonl")]
    args, plan = plan_for("--output-dir", tmp_path, "--preset", preset, "--data-path", *data)
    for step in (1, 2, 3):
        assert parsed_step(step, args, plan).data_path == data, step
        assert train.step_flags(step, args, plan).count("--data_path") == 1


def test_chat_template_sets_the_rendering_of_every_step(tmp_path):
    import train
    args, plan = plan_for("--output-dir", tmp_path, "--preset", "quick", "--chat-template", "none",
                          "--step2-args", "--chat_template auto")
    assert [parsed_step(step, args, plan).chat_template for step in (1, 2, 3)] == ["none", "auto", "none"]
    assert train.step_flags(1, args, plan).count("--chat_template") == 1
    args, plan = plan_for("--output-dir", tmp_path, "--preset", "quick")
    assert parsed_step(3, args, plan).chat_template == "auto"
    assert "--chat_template" not in train.step_flags(3, args, plan)


def test_summaries_name_the_recipe(tmp_path):
    import train
    (tmp_path / "step1_sft").mkdir()
    (tmp_path / "step1_sft" / "training_summary.json").write_text(
        json.dumps({"steps": 3, "perplexity_before": 9.0, "perplexity_after": 5.0}))
    line = train.summary_line(1, tmp_path / "step1_sft", 1.5, "deepspeed-chat")
    assert line.startswith("step 1 done in 1.5 min (deepspeed-chat recipe): perplexity 9 -> 5")
    head, step_line = train.pipeline_summary(2.0, "deepspeed-chat", [line])
    assert "recipe deepspeed-chat" in head and step_line == "    " + line
