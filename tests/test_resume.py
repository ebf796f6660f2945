"""Checkpoints and --resume: a run killed (SIGKILL) at a random step and resumed logs the same
losses as an uninterrupted run; SIGTERM saves and exits cleanly; a crash while writing a
checkpoint leaves the previous one loadable; non-finite losses are skipped, then stop the run."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, assert_ok, describe, ended_early, error_line, logged_rows, run_module, session_rng
from utils import checkpoint
from utils.config import ConfigError
from utils.rl_math import adaptive_kl_coef
from utils.stopping import NonFinite
from utils.strategy import DeepSpeedStrategy

MODULE = "training.step1_supervised_finetuning.main"
STEPS = 16
SAVE_STEPS = 3
RUN = ["--model_name_or_path", "tiny-llama", "--num_examples", "400", "--max_seq_len", "64",
       "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--learning_rate", "2e-3",
       "--dtype", "fp32", "--max_steps", str(STEPS), "--zero_stage", "2", "--disable_tqdm",
       "--log_interval", "1", "--save_steps", str(SAVE_STEPS)]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in logged_rows(out / "logs" / "metrics.jsonl") if "train/loss" in r}


def logged_steps(out: Path, key: str = "train/loss") -> list[int]:
    """Every step's log line in file order: a step logged twice (or lost) shows here, where a
    dict keyed by step would hide it."""
    return [r["step"] for r in logged_rows(out / "logs" / "metrics.jsonl") if key in r]


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def left_by_the_kill(out: Path, every: int, total: int, key: str, where: str) -> tuple[Path, str]:
    """What a SIGKILLed run left, read once it is dead (it may have logged or saved more between
    the poll that saw the kill point and the kill): its newest complete checkpoint, checked
    against its newest logged step, and `where` extended with both for later messages.

    A save at step n ends before step n + 1 is logged, so the newest checkpoint is the last save
    point before the newest logged step, or that step itself when its save had completed."""
    last = max(logged_steps(out, key), default=0)
    saved = checkpoint.latest(out)
    where += f"; after the kill: newest logged step {last}, newest checkpoint {saved and saved.name}"
    assert 0 < last < total, f"the run was not killed before its end: {where}"
    assert not (out / "training_summary.json").exists(), where
    before = (last - 1) // every * every  # the last save point before `last`
    allowed = {before, last} if last % every == 0 else {before}
    assert saved is not None and step_of(saved) in allowed, f"expected a checkpoint at step {sorted(allowed)}: {where}"
    return saved, where


def start(out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", MODULE, *RUN, "--output_dir", str(out), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    """Until the run has logged `step` (or fail, showing its output, if it ended first)."""
    deadline = time.time() + timeout
    while max(losses(out), default=0) < step:
        if proc.poll() is not None:
            raise ended_early(proc, f"the run ended before logging step {step}")
        if time.time() > deadline:
            raise ended_early(proc, f"step {step} not logged in {timeout}s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("resume") / "straight"
    assert_ok(run_module(MODULE, [*RUN, "--output_dir", out]))
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [p.name for p in checkpoint.complete(out)] == ["step-00000015", "step-00000016"]  # limit 2, end
    return got


def test_sigkill_at_a_random_step_then_resume_matches(tmp_path, uninterrupted):
    rng, seed = session_rng("test_sigkill_at_a_random_step_then_resume_matches")
    kill_at = rng.randint(4, STEPS - 6)
    where = f"kill point: once step {kill_at} of {STEPS} is logged ({seed})"
    out = tmp_path / "killed"
    proc = start(out)
    wait_for_step(proc, out, kill_at)
    proc.kill()  # SIGKILL: no chance to save
    proc.communicate()
    saved, where = left_by_the_kill(out, SAVE_STEPS, STEPS, "train/loss", where)
    proc = run_module(MODULE, [*RUN, "--output_dir", out, "--resume"])
    assert_ok(proc)
    assert f"resumed from {saved} (step {step_of(saved)}," in proc.stdout + proc.stderr, where + "\n" + describe(proc)
    assert logged_steps(out) == list(range(1, STEPS + 1)), where  # each step once: cut back, then continued
    resumed = losses(out)
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), f"step {step}; {where}"
    assert json.loads((out / "training_summary.json").read_text())["steps"] == STEPS, where


def test_sigterm_saves_and_exits_cleanly(tmp_path, uninterrupted):
    out = tmp_path / "termed"
    proc = start(out, "--save_steps", "0")  # no periodic checkpoints: the signal alone saves
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    out_text, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, describe(proc, out_text, err)
    saved, last = checkpoint.latest(out), max(losses(out))
    # no periodic saves: the one checkpoint is the signal's, at the step the run had reached
    assert saved is not None and step_of(saved) == last, (saved, last)
    proc = run_module(MODULE, [*RUN, "--output_dir", out, "--resume"])
    assert_ok(proc)
    assert f"resumed from {saved} (step {last}," in proc.stdout + proc.stderr, describe(proc)
    assert logged_steps(out) == list(range(1, STEPS + 1))
    resumed = losses(out)
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes one file per tag, or dies half-way."""
    checkpoint_engine = "DeepSpeed's writer"

    def __init__(self, fail: bool = False):
        self.fail, self.loaded = fail, None

    def save_checkpoint(self, folder, tag, save_latest=True):
        Path(folder, tag).mkdir(parents=True)
        Path(folder, tag, "part-1").write_text("x")
        if self.fail:
            raise OSError(28, "No space left on device")

    def zero_optimization_stage(self):
        return 0  # writes no ZeRO optimizer files, as stage 0

    def load_checkpoint(self, folder, tag, **_):
        self.loaded = Path(folder, tag)
        return (str(self.loaded), {}) if self.loaded.is_dir() else (None, None)


def test_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    checkpoint.save(DeepSpeedStrategy("fp32"), {"model": FakeEngine()}, checkpoint.LoopState(step=4, epoch=0, batches_done=4), tmp_path)
    with pytest.raises(OSError):
        checkpoint.save(DeepSpeedStrategy("fp32"), {"model": FakeEngine(fail=True)}, checkpoint.LoopState(step=6), tmp_path)
    assert (tmp_path / "checkpoints" / ".tmp-step-00000006").is_dir()  # the torn attempt, aside
    newest = checkpoint.latest(tmp_path)
    assert newest.name == "step-00000004"
    engine = FakeEngine()
    state = checkpoint.load(DeepSpeedStrategy("fp32"), {"model": engine}, newest)
    assert (state.step, state.batches_done) == (4, 4) and engine.loaded == newest / "model"


def test_rng_state_round_trips_through_json():
    import numpy as np
    import torch
    saved = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_non_finite_loss_skips_the_update():
    import torch

    class Recorder:
        calls = []

        def backward(self, loss):
            self.calls.append("backward")

        def step(self):
            self.calls.append("step")

    engine = Recorder()
    assert not DeepSpeedStrategy.step_if_finite(engine, torch.tensor(float("nan"))) and engine.calls == []
    assert not DeepSpeedStrategy.step_if_finite(engine, torch.tensor([1.0, float("inf")])) and engine.calls == []
    assert DeepSpeedStrategy.step_if_finite(engine, torch.tensor(0.3)) and engine.calls == ["backward", "step"]


def test_non_finite_losses_are_skipped_then_stop_the_run():
    guard = NonFinite(limit=2)
    assert not guard.skip(1.0, 0)
    assert guard.skip(float("nan"), 1) and guard.skip(float("inf"), 1)
    assert not guard.skip(0.5, 1) and guard.total == 2  # a good loss resets the streak
    guard.skip(float("nan"), 2)
    guard.skip(float("nan"), 2)
    with pytest.raises(ConfigError, match="3 micro-batches in a row"):
        guard.skip(float("nan"), 2)


STEP3 = "training.step3_rlhf_finetuning.main"
ROUNDS = 8
STEP3_RUN = ["--actor_model_name_or_path", "tiny-llama", "--critic_model_name_or_path", "tiny-llama",
             "--num_examples", "600", "--per_device_generation_batch_size", "4",
             "--per_device_training_batch_size", "2", "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8",
             "--num_warmup_steps", "0", "--actor_learning_rate", "1e-3", "--critic_learning_rate", "1e-3",
             "--dtype", "fp32", "--max_rounds", str(ROUNDS), "--enable_ema", "--disable_tqdm",
             "--log_interval", "1", "--save_steps", "2"]
KEYS = ("train/reward", "train/actor_loss", "train/critic_loss", "train/kl", "train/kl_coef")
ADAPTIVE_KL = ["--target_kl", "0.05", "--kl_horizon", "20"]


def step3_rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in logged_rows(out / "logs" / "metrics.jsonl") if "train/reward" in r}


CRITIC_FREE_PTX = ["--unsupervised_dataset_name", "bundled", "--advantage", "rloo", "--samples_per_prompt", "2"]


@pytest.mark.parametrize("stage,extra", [(2, CRITIC_FREE_PTX), (3, ADAPTIVE_KL)])
def test_step3_killed_and_resumed_matches_an_uninterrupted_run(tmp_path, stage, extra):
    """ZeRO-2 critic-free (no critic in the checkpoints) with ptx, and ZeRO-3 PPO with the
    adaptive KL controller: a SIGKILLed run resumed logs the uninterrupted run's rounds."""
    flags = [*STEP3_RUN, "--actor_zero_stage", str(stage), "--critic_zero_stage", str(stage), *extra]
    straight = tmp_path / "straight"
    assert_ok(run_module(STEP3, [*flags, "--output_dir", straight]))
    expected = step3_rows(straight)
    assert sorted(expected) == list(range(1, ROUNDS + 1))
    if extra == ADAPTIVE_KL:  # each round's coefficient follows from the previous round's KL
        for step in range(1, ROUNDS):
            row = expected[step]
            assert expected[step + 1]["train/kl_coef"] == pytest.approx(
                adaptive_kl_coef(row["train/kl_coef"], row["train/kl"], 0.05, 4, 20), rel=1e-5)
        assert expected[ROUNDS]["train/kl_coef"] != pytest.approx(0.1)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", STEP3, *flags, "--output_dir", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while max(step3_rows(out), default=0) < 3:  # round 3 logged: the round-2 checkpoint is complete
        if proc.poll() is not None or time.time() > deadline:
            raise ended_early(proc, "round 3 not logged before the run ended or 300 s passed")
        time.sleep(0.2)
    proc.kill()
    proc.communicate()
    saved, where = left_by_the_kill(out, 2, ROUNDS, "train/reward", f"killed once round 3 of {ROUNDS} was logged")
    proc = run_module(STEP3, [*flags, "--output_dir", out, "--resume"])
    assert_ok(proc)
    assert f"resumed from {saved} (step {step_of(saved)}," in proc.stdout + proc.stderr, where + "\n" + describe(proc)
    assert logged_steps(out, "train/reward") == list(range(1, ROUNDS + 1)), where
    resumed = step3_rows(out)
    for step, row in expected.items():
        for key in KEYS:
            assert resumed[step][key] == pytest.approx(row[key], rel=1e-3, abs=1e-4), (step, key, where)
    folders = ("actor", "actor_ema") if extra == CRITIC_FREE_PTX else ("actor", "actor_ema", "critic")
    assert sorted(p.name for p in out.iterdir() if (p / "model.safetensors").is_file()) == sorted(folders)


@pytest.mark.parametrize("module", [MODULE, STEP3])
@pytest.mark.parametrize("flag", ["--save_steps", "--save_total_limit", "--max_nonfinite_steps"])
def test_negative_checkpoint_flags_are_refused(tmp_path, module, flag):
    proc = run_module(module, [flag, "-1", "--output_dir", tmp_path / "out"])
    assert error_line(proc) == f"error: {flag} must be >= 0, got -1"
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_zero_layout_is_refused_in_one_line(tmp_path):
    """One process runs --zero_stage 1-2 as stage 0 now; a checkpoint saved at ZeRO-2 there
    (older versions, or --deepspeed_config) has its optimizer state in ZeRO's files, which
    DeepSpeed's stage-0 load crashed on (AttributeError). Refused in one line naming the fix;
    resumed with that fix, the run goes on."""
    zero2 = tmp_path / "zero2.json"
    zero2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    run = [*RUN, "--output_dir", tmp_path / "out", "--save_steps", "2"]
    assert_ok(run_module(MODULE, [*run, "--max_steps", "2", "--deepspeed_config", zero2]))
    line = error_line(run_module(MODULE, [*run, "--max_steps", "4", "--resume"]))
    assert "holds ZeRO-sharded optimizer state" in line and "--deepspeed_config" in line, line
    resumed = run_module(MODULE, [*run, "--max_steps", "4", "--resume", "--deepspeed_config", zero2])
    assert_ok(resumed)
    assert sorted(losses(tmp_path / "out")) == [1, 2, 3, 4]
