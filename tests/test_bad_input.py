"""The bad-input catalogue (README, "Bad input"): what the other test files do not already cover.

Each case runs a step the way a user does (a subprocess of its main) and checks the project's
convention: one `error: ...` line last on stderr, exit 2, no traceback, and nothing already
saved lost. Model-loading failures are also checked in-process, where they are cheap."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, assert_ok, error_line, run_module, save_malicious_weights
from utils import checkpoint
from utils.config import ConfigError
from utils.metrics import read_jsonl

STEP1 = "training.step1_supervised_finetuning.main"
STEP2 = "training.step2_reward_model_finetuning.main"
QUICK = ["--model_name_or_path", "tiny-llama", "--num_examples", "400", "--max_seq_len", "64",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
         "--learning_rate", "2e-3", "--dtype", "fp32", "--disable_tqdm", "--log_interval", "1"]


def refused(module: str, args, out: Path) -> str:
    """Run a step that must refuse: its one error line; nothing written to `out`."""
    line = error_line(run_module(module, [*QUICK, *args, "--output_dir", out]))
    assert line.startswith("error: ")
    assert not out.exists()
    return line


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- models that cannot be loaded

def _base() -> Path:
    from utils.model import resolve_model_path
    return Path(resolve_model_path("tiny-llama"))


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    save_file(change(state), folder / "model.safetensors", metadata={"format": "pt"})


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


CODE_RAN = "code-ran"  # what the malicious pickle below creates if it is ever unpickled


def _pickle_of_objects(folder: Path) -> None:
    """The weights only as pytorch_model.bin, which also holds an object whose unpickling runs code."""
    from safetensors.torch import load_file
    save_malicious_weights(folder / "pytorch_model.bin", folder / CODE_RAN, load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()


def _weights_in_a_pt_file(folder: Path) -> None:
    from safetensors.torch import load_file
    torch.save(load_file(folder / "model.safetensors"), folder / "model.pt")
    (folder / "model.safetensors").unlink()


BROKEN_MODELS = {  # name: (how the copy of tiny-llama is broken, what the error line says)
    "corrupt_config": (lambda d: (d / "config.json").write_text("{not json"), "config.json' is not a valid JSON"),
    "unknown_model_type": (lambda d: _config(d, model_type="no-such-arch"), "model type `no-such-arch`"),
    "truncated_weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                          "cannot load the weights of"),
    "garbage_weights": (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 100), "cannot load the weights of"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "no file named model.safetensors"),
    "pickle_of_objects": (_pickle_of_objects, "pytorch_model.bin holds Python objects other than tensors (os.makedirs)"),
    "weights_in_a_pt_file": (_weights_in_a_pt_file, "holds no model.safetensors or pytorch_model.bin, only model.pt"),
    "missing_weights": (lambda d: _rewrite_weights(d, lambda s: {k: v for k, v in s.items() if "layers.3." not in k}),
                        "of the model's weights are not in its checkpoint"),
    "weights_of_another_shape": (lambda d: _config(d, intermediate_size=1024), "do not fit its config.json"),
}


def broken_model(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(_base(), folder)
    BROKEN_MODELS[name][0](folder)
    return folder


@pytest.mark.parametrize("name", sorted(BROKEN_MODELS))
def test_unloadable_models_are_one_config_error(tmp_path, name):
    from utils.model import load_causal_lm, load_reward_model, load_tokenizer
    folder = broken_model(tmp_path, name)
    for load in (load_causal_lm, load_reward_model):
        with pytest.raises(ConfigError) as err:
            load(str(folder), load_tokenizer("tiny-llama"))
        assert BROKEN_MODELS[name][1] in str(err.value) and "\n" not in str(err.value)
    assert not (folder / CODE_RAN).exists()


def test_a_new_value_head_on_a_causal_lm_is_not_a_missing_weight():
    """A reward model from a causal LM loads (its score head starts fresh: allowed) and every
    other weight is the checkpoint's own, not a freshly initialized one."""
    from safetensors.torch import load_file

    from utils.model import load_reward_model, load_tokenizer
    state = load_reward_model("tiny-llama", load_tokenizer("tiny-llama")).hf_model.state_dict()
    saved = load_file(_base() / "model.safetensors")
    backbone = sorted(k for k in state if k != "score.weight")
    assert backbone and set(backbone) <= set(saved), sorted(set(backbone) - set(saved))
    differ = [k for k in backbone if not torch.equal(state[k], saved[k])]
    assert not differ, f"not loaded from the checkpoint: {differ}"
    assert state["score.weight"].shape == (1, saved["model.embed_tokens.weight"].shape[1])


@pytest.mark.parametrize("name", ["corrupt_config", "unknown_model_type", "truncated_weights", "pickle_of_objects",
                                  "missing_weights"])
def test_unloadable_model_through_step1(tmp_path, name):
    folder = broken_model(tmp_path, name)
    line = refused(STEP1, ["--model_name_or_path", folder], tmp_path / "out")
    assert BROKEN_MODELS[name][1] in line and str(folder) in line
    assert not (folder / CODE_RAN).exists()


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    from utils.model import auto_dtype_name, resolve_dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(ConfigError, match="bf16 needs a GPU that computes in it"):
        resolve_dtype("bf16", "cuda:0")
    assert auto_dtype_name("cuda") == "fp16"  # emulated bf16 is not picked either


# ---------------------------------------------------------------- data and flags, through the entry point

@pytest.mark.parametrize("content,expected", [
    (None, "data file not found: "),
    ('{"prompt": "a", "chosen": "b"}\n{"prompt": "a", \n', "line 2 is not valid JSON"),
], ids=["missing", "corrupt"])
def test_missing_or_corrupt_data_file_through_step1(tmp_path, content, expected):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    line = refused(STEP1, ["--data_path", data], tmp_path / "out")
    assert expected in line and str(data) in line


@pytest.mark.parametrize("args,message", [
    (["--offload", "--zero_stage", "0"], "--offload needs ZeRO stage 1, 2 or 3"),
    (["--deepspeed_config", "{dir}/ds.json"], "sets train_batch_size 10, which is not --per_device_train_batch_size 4"),
    (["--deepspeed_config", "{dir}/nope.json"], "--deepspeed_config file not found"),
], ids=["offload_without_zero", "batch_in_ds_config", "missing_ds_config"])
def test_engine_settings_it_cannot_run_are_refused_before_loading(tmp_path, args, message):
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 10}))
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    proc = run_module(STEP1, [*QUICK, *args, "--model_name_or_path", tmp_path / "no-model-here",
                              "--output_dir", tmp_path / "out"])
    assert message in error_line(proc)  # refused before the (missing) model is even looked at


def test_pairs_cut_to_the_same_sequence_are_dropped_and_reported(tmp_path):
    data = tmp_path / "long.jsonl"
    prompt = "word " * 80 + "Which is right?"
    data.write_text("".join(json.dumps({"prompt": f"{i} {prompt}", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(30)))
    proc = run_module(STEP2, [*QUICK, "--data_path", data, "--data_split", "0,1,0", "--output_dir", tmp_path / "out"])
    line = error_line(proc)
    assert "no Step 2 training rows" in line and "--max_seq_len 64 dropped 30 rows" in line
    said = [s for s in proc.stderr.splitlines() if "dropped 30 pairs" in s]
    assert len(said) == 1 and "same within max_seq_len 64 tokens" in said[0]


def test_rows_a_long_prompt_leaves_nothing_to_learn_from_are_dropped_and_counted():
    from utils.data.pipeline import tokenize_rows
    from utils.model import load_tokenizer
    tok = load_tokenizer("tiny-llama")
    rows = [("src", {"prompt": "short question", "chosen": "yes", "rejected": "no"}),
            ("src", {"prompt": "word " * 80, "chosen": "yes", "rejected": "no"})]
    stats = {}
    pairs = tokenize_rows(rows, 2, tok, 16, stats=stats)  # Step 2 / DPO: the long one compares nothing
    assert len(pairs["chosen_input_ids"]) == 1 and stats["same_after_cut"] == 1
    assert pairs["chosen_input_ids"][0] != pairs["rejected_input_ids"][0]
    sft = tokenize_rows(rows, 1, tok, 16, response_loss_only=True, stats=stats)  # Step 1: no answer token left
    assert len(sft["input_ids"]) == 1 and stats["no_answer_tokens"] == 1
    sft = tokenize_rows(rows, 1, tok, 16, stats=stats)  # without --response_loss_only the prompt is learnt
    assert len(sft["input_ids"]) == 2 and len(sft["input_ids"][1]) == 16


# ---------------------------------------------------------------- gradient accumulation that does not divide an epoch

def test_accumulation_that_does_not_divide_an_epoch_steps_at_its_end(tmp_path):
    """20 rows / 4 = 5 micro-batches per epoch, accumulated by 3: a step of 3 and one of 2 in
    each of 2 epochs. The engine's optimizer steps and the loop's count must agree: 4 logged
    steps, and the cosine schedule reaches 0 exactly at the 4th."""
    out = tmp_path / "ga"
    proc = run_module(STEP1, [*QUICK, "--num_examples", "100", "--zero_stage", "2", "--gradient_accumulation_steps",
                              "3", "--num_train_epochs", "2", "--output_dir", out])
    assert_ok(proc)
    assert "step1: 20 train" in proc.stdout + proc.stderr
    rows = [r for r in read_jsonl(out / "logs" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 4
    assert rows[-1]["train/lr"] == pytest.approx(0.0, abs=1e-9) and rows[-2]["train/lr"] > 0


# ---------------------------------------------------------------- a folder that holds another run

def test_overwrite_does_not_mix_in_the_previous_runs_checkpoints_or_log(tmp_path):
    out = tmp_path / "sft"
    shutil.copytree(_base(), out)  # a finished earlier run: its model, log and checkpoint
    (out / "logs").mkdir()
    (out / "logs" / "metrics.jsonl").write_text(json.dumps({"step": 50, "train/loss": 9.0}) + "\n")
    (out / "checkpoints" / "step-00000050").mkdir(parents=True)
    (out / "checkpoints" / "step-00000050" / "state.json").write_text(json.dumps({"step": 50}))
    (out / "checkpoints" / "notes.txt").write_text("mine")  # not a checkpoint: stays
    proc = run_module(STEP1, [*QUICK, "--max_steps", "2", "--save_steps", "1", "--overwrite_output_dir",
                              "--output_dir", out])
    assert_ok(proc)
    assert "removed the previous run's 1 checkpoint folder(s)" in proc.stdout + proc.stderr
    assert [p.name for p in checkpoint.complete(out)] == ["step-00000001", "step-00000002"]
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"
    assert 50 not in {r["step"] for r in read_jsonl(out / "logs" / "metrics.jsonl")}


# ---------------------------------------------------------------- a full disk while saving

def test_a_refused_swap_puts_the_old_folder_and_its_kept_entries_back(tmp_path, monkeypatch):
    from utils import fs
    out = tmp_path / "model"
    fs.atomic_directory_write(out, lambda d: (d / "weights").write_text("v1"))
    (out / "logs").mkdir()
    (out / "logs" / "metrics.jsonl").write_text("{}\n")
    real_rename = os.rename

    def rename(src, dst):  # the new folder cannot be renamed into place
        if Path(dst) == out and ".tmp-" in Path(src).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(fs.os, "rename", rename)
    with pytest.raises(fs.WriteRefused, match=f"^could not write {out}: No space left on device"):
        fs.atomic_directory_write(out, lambda d: (d / "weights").write_text("v2"), keep=("logs",))
    assert (out / "weights").read_text() == "v1"
    assert (out / "logs" / "metrics.jsonl").read_text() == "{}\n"  # moved into the new folder, and back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def full_disk(prefix: Path, args, module: str = STEP1) -> subprocess.CompletedProcess:
    """A step (Step 1 by default) whose writes under `prefix` fail with ENOSPC (see tests/full_disk.py)."""
    return subprocess.run([sys.executable, "-m", "tests.full_disk", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RLHFKIT_TEST_FULL_DISK": str(prefix)})


@pytest.mark.slow
def test_full_disk_while_saving_the_model_keeps_the_folder_then_resume_saves(tmp_path):
    out = tmp_path / "sft"
    shutil.copytree(_base(), out)  # the model an earlier run left there
    before = {p.name: digest(p) for p in out.iterdir()}
    args = [*QUICK, "--max_steps", "2", "--save_steps", "2", "--output_dir", out]
    proc = full_disk(tmp_path / ".sft.tmp-", [*args, "--overwrite_output_dir"])
    line = error_line(proc)
    assert line.startswith(f"error: could not write {out}: No space left on device")
    assert "make room and rerun with --resume to save the model" in line
    assert {p.name: digest(p) for p in out.iterdir() if p.is_file()} == before  # the old model, untouched
    assert [p.name for p in checkpoint.complete(out)] == ["step-00000002"]
    assert any("train/loss" in r for r in read_jsonl(out / "logs" / "metrics.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no temporary folders left

    assert_ok(run_module(STEP1, [*args, "--resume"]))  # room again: the checkpoint becomes the model
    assert digest(out / "model.safetensors") != before["model.safetensors"]
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_full_disk_while_checkpointing_keeps_the_newest_checkpoint_then_resume(tmp_path):
    out = tmp_path / "sft"
    args = [*QUICK, "--zero_stage", "2", "--max_steps", "3", "--save_steps", "1", "--output_dir", out]
    line = error_line(full_disk(out / "checkpoints" / ".tmp-step-00000002", args))
    assert line.startswith("error: could not write the step 2 checkpoint: No space left on device")
    newest = out / "checkpoints" / "step-00000001"
    assert f"the newest complete checkpoint, {newest}, is intact" in line
    assert [p.name for p in checkpoint.complete(out)] == ["step-00000001"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]  # torn one removed
    assert not (out / "model.safetensors").exists()

    proc = run_module(STEP1, [*args, "--resume"])
    assert_ok(proc)
    assert f"resumed from {newest} (step 1" in proc.stdout + proc.stderr
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 3


# ---------------------------------------------------------------- a real non-finite loss

def test_non_finite_stop_before_any_checkpoint_says_none_was_saved_yet(tmp_path):
    """Stopped before the first --save_steps boundary: the line says so, whatever --save_steps is."""
    from utils.stopping import NonFinite
    guard = NonFinite(1, str(tmp_path), advice="Lower --learning_rate")
    assert guard.skip(float("nan"), 0)
    with pytest.raises(ConfigError) as err:
        guard.skip(float("inf"), 0)
    assert str(err.value) == ("loss was inf for 2 micro-batches in a row at step 0; no checkpoint was saved "
                              "yet. Lower --learning_rate")


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_its_checkpoint_resumes(tmp_path):
    """A learning rate of 1e30: the first update throws the weights so far that every later
    loss is NaN. The run skips --max_nonfinite_steps micro-batches, then stops; the
    checkpoint written after step 1 is complete, and --resume loads it."""
    out = tmp_path / "nan"
    args = [*QUICK, "--zero_stage", "2", "--max_steps", "6", "--save_steps", "1", "--learning_rate", "1e30",
            "--lr_scheduler_type", "constant", "--output_dir", out]
    proc = run_module(STEP1, [*args, "--max_nonfinite_steps", "2"])
    newest = out / "checkpoints" / "step-00000001"
    assert error_line(proc) == (f"error: loss was nan for 3 micro-batches in a row at step 1; the newest "
                                f"checkpoint, {newest}, is intact. Lower --learning_rate, use --dtype fp32 "
                                "or --compute_fp32_loss")
    logged = read_jsonl(out / "logs" / "metrics.jsonl")
    assert [r["train/skipped_nonfinite"] for r in logged if "train/skipped_nonfinite" in r] == [1, 2]
    assert [p.name for p in checkpoint.complete(out)] == ["step-00000001"]
    assert not (out / "model.safetensors").exists()

    proc = run_module(STEP1, [*args, "--resume", "--max_nonfinite_steps", "0"])
    assert f"resumed from {newest} (step 1" in proc.stdout + proc.stderr
    assert "loss was nan for 1 micro-batches in a row at step 1" in error_line(proc)


# ---------------------------------------------------------------- Step 3

STEP3 = "training.step3_rlhf_finetuning.main"
STEP3_QUICK = ["--actor_model_name_or_path", "tiny-llama", "--critic_model_name_or_path", "tiny-llama",
               "--num_examples", "600", "--per_device_generation_batch_size", "2",
               "--per_device_training_batch_size", "2", "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8",
               "--num_warmup_steps", "0", "--dtype", "fp32", "--disable_tqdm", "--log_interval", "1"]


@pytest.mark.parametrize("args,message", [
    (["--offload", "--actor_zero_stage", "2"], "--offload needs ZeRO stage 1, 2 or 3 (--critic_zero_stage)"),
    (["--offload", "--critic_zero_stage", "2"], "--offload needs ZeRO stage 1, 2 or 3 (--actor_zero_stage)"),
    (["--deepspeed_config", "{dir}/ds.json"], "sets train_micro_batch_size_per_gpu 3 but "
                                              "--per_device_training_batch_size is 2"),
], ids=["offload_critic_zero0", "offload_actor_zero0", "batch_in_ds_config"])
def test_step3_engine_settings_it_cannot_run_are_refused_before_loading(tmp_path, args, message):
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    out = tmp_path / "out"
    proc = run_module(STEP3, [*STEP3_QUICK, *args, "--actor_model_name_or_path", tmp_path / "no-model-here",
                              "--critic_model_name_or_path", tmp_path / "no-model-here", "--output_dir", out])
    assert message in error_line(proc)  # refused before the (missing) models are even looked at
    assert not out.exists()


def test_replacing_folders_is_all_or_none(tmp_path, monkeypatch):
    from utils import fs
    for name in ("a", "b", "c"):
        fs.atomic_directory_write(tmp_path / name, lambda d, n=name: (d / "w").write_text(f"old {n}"))
        fs.atomic_directory_write(tmp_path / "new" / name, lambda d, n=name: (d / "w").write_text(f"new {n}"))
    real_rename = os.rename

    def rename(src, dst):  # "c" cannot be renamed into place, after "a" and "b" were
        if Path(dst) == tmp_path / "c" and Path(src).parent.name == "new":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_rename(src, dst)

    moves = {tmp_path / "new" / n: tmp_path / n for n in ("a", "b", "c")}
    monkeypatch.setattr(fs.os, "rename", rename)
    with pytest.raises(fs.WriteRefused, match=f"^could not write {tmp_path / 'c'}: No space left on device"):
        fs.replace_directories(moves)
    assert [(tmp_path / n / "w").read_text() for n in "abc"] == ["old a", "old b", "old c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "new"]  # no folder left aside
    monkeypatch.setattr(fs.os, "rename", real_rename)
    fs.replace_directories(moves)
    assert [(tmp_path / n / "w").read_text() for n in "abc"] == ["new a", "new b", "new c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "new"] and not any((tmp_path / "new").iterdir())


@pytest.mark.slow
def test_step3_full_disk_while_saving_the_models_keeps_all_then_resume_saves(tmp_path):
    """The disk fills while the critic is written, after the actor and the EMA actor were:
    none of the three folders an earlier run left is replaced, one line says so, and --resume
    (the round's checkpoint) saves all three."""
    from training.step3_rlhf_finetuning.loop import STAGING
    out = tmp_path / "step3"
    for folder in ("actor", "actor_ema", "critic"):
        shutil.copytree(_base(), out / folder)  # the models an earlier run left there
    before = {p.relative_to(out): digest(p) for p in out.rglob("*") if p.is_file()}
    args = [*STEP3_QUICK, "--max_rounds", "1", "--save_steps", "1", "--enable_ema", "--output_dir", out]
    proc = full_disk(out / STAGING / ".critic.tmp-", [*args, "--overwrite_output_dir"], module=STEP3)
    line = error_line(proc)
    assert line.startswith("error: could not write the final critic model: No space left on device")
    newest = out / "checkpoints" / "step-00000001"
    assert (f"actor, actor_ema, critic in {out} hold what they held before (none was replaced), with the "
            f"newest checkpoint {newest}: make room and rerun with --resume to save the models") in line
    assert {p.relative_to(out): digest(p) for p in out.rglob("*")
            if p.is_file() and p.parts[len(out.parts)] in ("actor", "actor_ema", "critic")} == before
    assert sorted(p.name for p in out.iterdir()) == ["actor", "actor_ema", "checkpoints", "critic", "logs"]
    assert [p.name for p in checkpoint.complete(out)] == ["step-00000001"]

    proc = run_module(STEP3, [*args, "--resume"])  # room again: the checkpoint becomes the models
    assert_ok(proc)
    assert f"resumed from {newest} (step 1" in proc.stdout + proc.stderr
    for folder in ("actor", "actor_ema", "critic"):
        assert json.loads((out / folder / "training_summary.json").read_text())["rounds"] == 1
    assert digest(out / "critic" / "model.safetensors") != before[Path("critic/model.safetensors")]
    assert sorted(p.name for p in out.iterdir()) == ["actor", "actor_ema", "checkpoints", "critic", "logs"]


@pytest.mark.slow
def test_step3_diverging_critic_stops_naming_the_newest_checkpoint(tmp_path):
    """A critic learning rate of 1e30: round 1's update throws the critic's weights so far
    that round 2's values, advantages and losses are NaN; with --max_nonfinite_steps 0 the
    first skipped micro-batch stops the run, naming round 1's checkpoint."""
    out = tmp_path / "nan"
    proc = run_module(STEP3, [*STEP3_QUICK, "--max_rounds", "2", "--save_steps", "1", "--critic_learning_rate",
                              "1e30", "--lr_scheduler_type", "constant", "--max_nonfinite_steps", "0",
                              "--output_dir", out])
    newest = out / "checkpoints" / "step-00000001"
    assert error_line(proc) == (f"error: loss was nan for 1 micro-batches in a row at step 1; the newest "
                                f"checkpoint, {newest}, is intact. Lower --actor_learning_rate/"
                                "--critic_learning_rate or use --dtype fp32")
    assert [p.name for p in checkpoint.complete(out)] == ["step-00000001"]
    assert not (out / "actor").exists()
