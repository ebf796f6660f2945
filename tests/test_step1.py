"""Step 1 end to end on tiny models: ZeRO stages, offload, LoRA, two processes, bad input.

Each run is a subprocess (as users start it): DeepSpeed patches torch process-wide, so runs
must not share the test process."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from utils.cli import free_port
from utils.metrics import read_jsonl

from tests.helpers import assert_ok, describe, run_module

ROOT = Path(__file__).resolve().parents[1]
MODULE = "training.step1_supervised_finetuning.main"
# Small but real: 400 bundled examples, 2,4,4 split -> ~70 training rows for Step 1.
QUICK = ["--model_name_or_path", "tiny-llama", "--num_examples", "400", "--max_seq_len", "64",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
         "--learning_rate", "2e-3", "--dtype", "fp32", "--max_steps", "6", "--disable_tqdm",
         "--log_interval", "2"]


def run(args, launcher=None, timeout=600):
    return run_module(MODULE, args, launcher, timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert_ok(proc)
    return proc


def summary(out: Path) -> dict:
    return json.loads((out / "training_summary.json").read_text())


def assert_reloads_and_generates(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok(" Human: What is 2 + 3? Assistant:", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert not any(p.endswith(".bin") or p.endswith(".pt") for p in os.listdir(out))


@pytest.mark.parametrize("zero_stage,extra", [
    (0, ["--gradient_checkpointing", "--dropout", "0.0"]),
    (2, ["--gradient_accumulation_steps", "2"]),
    (3, []),
    (2, ["--offload"]),
    (3, ["--offload", "--dtype", "bf16"]),
])
def test_zero_stages_train_and_save(tmp_path, zero_stage, extra):
    out = tmp_path / "sft"
    ok(run([*QUICK, "--zero_stage", str(zero_stage), "--output_dir", str(out), *extra]))
    s = summary(out)
    assert s["steps"] == 6
    assert s["loss_after"] < s["loss_before"]
    assert (out / "model.safetensors").exists()
    assert_reloads_and_generates(out)


@pytest.mark.parametrize("model", ["tiny-gpt_neox-h64", "tiny-qwen2-h64", "tiny-opt-h256"])
def test_zero3_saves_models_whose_layers_are_below_the_persistence_threshold(tmp_path, model):
    """ZeRO-3 keeps parameters under stage3_param_persistence_threshold whole on every rank, as
    views of shared storage: the final save refused them ("None is covering the entire
    storage") and a finished run lost its export. h64 models have 4k-element attention
    matrices (below the threshold), h256 262k-element MLP matrices (above DeepSpeed's default)."""
    out = tmp_path / "sft"
    ok(run([*QUICK, "--model_name_or_path", model, "--zero_stage", "3", "--max_steps", "2",
            "--output_dir", str(out)]))
    assert summary(out)["steps"] == 2
    assert_reloads_and_generates(out)


def test_loss_falls_on_bundled_data_and_metrics_logged(tmp_path):
    out = tmp_path / "sft"
    ok(run([*QUICK, "--max_steps", "0", "--num_train_epochs", "2", "--zero_stage", "2",
            "--response_loss_only", "--enable_tensorboard", "--output_dir", str(out)]))
    records = read_jsonl(out / "logs" / "metrics.jsonl")
    train = [r["train/loss"] for r in records if "train/loss" in r]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert len(evals) == 3  # before training and after each of the two epochs
    assert train[-1] < train[0] * 0.8
    assert evals[-1] < evals[0] * 0.8
    assert all(r["train/tokens_per_s"] > 0 for r in records if "train/loss" in r)
    assert (out / "logs" / "curves.png").stat().st_size > 1000
    assert any((out / "logs" / "tensorboard").iterdir())


def logged_scalars(folder) -> dict[str, int]:
    """Tag -> number of scalar events in the TensorBoard event files of `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: len(events.Scalars(tag)) for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("where", [".", "tb"])
def test_tensorboard_events_in_the_output_folder_survive_the_final_save(tmp_path, where):
    """DeepSpeed-Chat's scripts pass --tensorboard_path $OUTPUT: the final save replaces the
    output folder atomically, and the events written there (or in a folder inside it) must come
    through whole, every scalar readable (they used to be dropped, and the writer's last flush
    could hit the folder mid-replacement and crash the run)."""
    out = tmp_path / "sft"
    ok(run([*QUICK, "--max_steps", "3", "--log_interval", "1", "--enable_tensorboard",
            "--tensorboard_path", str(out / where), "--output_dir", str(out)]))
    assert (out / "model.safetensors").is_file() and (out / "logs" / "metrics.jsonl").is_file()
    scalars = logged_scalars(out / where)
    assert scalars.get("train/loss") == 3 and scalars.get("eval/loss", 0) >= 1, scalars


def test_lora_trains_only_adapters_and_exports_merged(tmp_path):
    out = tmp_path / "sft_lora"
    ok(run([*QUICK, "--zero_stage", "2", "--lora_dim", "8", "--only_optimize_lora",
            "--lora_learning_rate", "1e-2", "--output_dir", str(out)]))
    from safetensors.torch import load_file
    state = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in state)
    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
    base_path = resolve_model_path("tiny-llama")
    base = load_causal_lm(base_path, load_tokenizer(base_path)).state_dict()
    changed = [k for k in state if not torch.equal(state[k].float(), base[k].float())]
    # only the LoRA-targeted projections moved; embeddings and norms stayed frozen
    assert changed and all("proj" in k for k in changed), changed
    assert summary(out)["loss_after"] < summary(out)["loss_before"]
    assert_reloads_and_generates(out)


@pytest.mark.slow
def test_zero3_two_processes(tmp_path):
    out = tmp_path / "sft_2p"
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    proc = ok(run([*QUICK, "--zero_stage", "3", "--output_dir", str(out)], launcher=launcher))
    assert "2 process(es)" in proc.stdout + proc.stderr
    s = summary(out)
    assert s["steps"] == 6 and s["loss_after"] < s["loss_before"]
    assert_reloads_and_generates(out)


# ---------------------------------------------------------------- bad input

def bad(args, tmp_path) -> str:
    proc = run([*QUICK, "--output_dir", str(tmp_path / "never"), *args])
    assert proc.returncode != 0, describe(proc)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    assert not (tmp_path / "never").exists()
    return last


def test_bad_input_missing_column(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"question": "hi", "chosen": "hello"}\n' * 20)
    assert "prompt" in bad(["--data_path", str(data)], tmp_path)


def test_bad_input_empty_file(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert "empty" in bad(["--data_path", str(data)], tmp_path)


def test_bad_input_missing_model(tmp_path):
    assert "no/such-model-dir" in bad(["--model_name_or_path", "no/such-model-dir"], tmp_path)


def test_bad_input_split(tmp_path):
    assert "--data_split" in bad(["--data_split", "2,4"], tmp_path)


def test_bad_input_dtype_device_cannot_run(tmp_path):
    assert "fp16" in bad(["--dtype", "fp16"], tmp_path)


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run([*QUICK, "--output_dir", str(out)])
    assert proc.returncode == 2 and "--overwrite_output_dir" in proc.stderr, describe(proc)
    assert (out / "precious.txt").read_text() == "keep me"
