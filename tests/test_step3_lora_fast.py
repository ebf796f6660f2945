"""Step 3 with actor LoRA and --only_optimize_lora (issue 21, item 2): the reference is the actor
with its adapters off (no second base loaded), only the adapters get Adam state, and the EMA is
an fp32 average of the adapters alone, saved merged and resumed exactly.

The engine-level checks run in a subprocess per ZeRO stage (tests/lora_reference_check.py;
DeepSpeed patches torch process-wide); the end-to-end ones run Step 3 as a user would."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_ok, run_module
from tests.test_step3 import MODULE, QUICK, finished
from utils.cli import free_port

LORA_FAST = ["--actor_lora_dim", "8", "--only_optimize_lora", "--enable_ema", "--actor_lora_learning_rate", "5e-2"]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """zero stage -> tests/lora_reference_check.py's report, run once per stage."""
    reports = {}

    def get(stage: int) -> dict:
        if stage not in reports:
            out = tmp_path_factory.mktemp(f"lora_z{stage}") / "report.json"
            assert_ok(run_module("tests.lora_reference_check", ["--zero_stage", stage, "--out", out]))
            reports[stage] = json.loads(out.read_text())
        return reports[stage]
    return get


@pytest.mark.parametrize("stage", [0, 3])
def test_the_adapter_off_reference_scores_like_a_separately_loaded_copy(checked, stage):
    r = checked(stage)
    for kind in ("padded", "packed"):
        assert r[f"ref_gap_{kind}"] <= 1e-5, r  # fp32: the same base weights, the same forward
        assert r[f"actor_gap_{kind}"] > 0.1, r  # the adapters have moved: the comparison means something
        assert r[f"ref_requires_grad_{kind}"] is False
    assert r["ref_packs"] is True and r["old_packs"] is True  # the packed path really ran
    assert r["actor_training_after_ref"] is True  # scoring leaves the actor's mode as it found it


@pytest.mark.parametrize("stage", [0, 3])
def test_no_second_base_is_loaded(checked, stage):
    r = checked(stage)
    assert r["loads"] == 1 and not r["critic"] and not r["reward"]  # the actor alone (critic-free, checker)
    assert r["ref_params_shared"] and not r["ref_has_lora"]  # the reference's weights are the actor's base


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_only_the_adapters_get_adam_state(checked, stage):
    r = checked(stage)
    assert r["trainable_all_lora"]
    # ZeRO 2/3 flatten what they are given into fp32 partitions: the adapters' numbers, no more
    assert r["adam_state_numel"] == r["lora_numel"] < r["model_numel"] / 10, r


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_the_adapter_ema_is_its_fp32_definition_and_saves_merged(checked, stage):
    r = checked(stage)
    assert r["ema_numel"] == r["lora_numel"]  # adapter-sized, not a model copy
    assert r["ema_gap"] < 1e-6 and r["ema_moved"] > 1e-3, r
    assert r["swap_restored"]  # saving actor_ema leaves the actor's adapters bit for bit
    assert r["ema_saved_gap"] < 1e-6 and r["ema_saved_differs_from_actor"] > 1e-3, r
    assert r["resume_equal"]
    assert r["checkpoint_bytes"] < 4 * r["lora_numel"] + 65536  # the checkpoint holds the adapters' averages


def saved(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


def test_end_to_end_saves_actor_and_ema_that_reload_and_resume_equals_save(tmp_path):
    """Two rounds with a checkpoint after each; then the round-1 checkpoint resumed in a fresh
    folder ends with the same actor and actor_ema."""
    from transformers import AutoModelForCausalLM
    flags = [*QUICK, *LORA_FAST, "--offload_reference_model", "--save_steps", "1"]
    straight = tmp_path / "straight"
    proc = run_module(MODULE, [*flags, "--output_dir", straight])
    finished(proc, straight, folders=("actor", "actor_ema", "critic"))
    assert "--offload_reference_model: nothing to place" in proc.stdout
    checkpoint = straight / "checkpoints" / "step-00000001"
    assert (checkpoint / "actor_ema.safetensors").stat().st_size < 1 << 20  # adapters, not a model
    for name in ("actor", "actor_ema"):
        model = AutoModelForCausalLM.from_pretrained(straight / name)
        assert not any("lora" in k for k in model.state_dict())
    actor, ema = saved(straight / "actor"), saved(straight / "actor_ema")
    assert max((actor[k] - ema[k]).abs().max() for k in actor) > 0  # the average lags the actor
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    assert_ok(run_module(MODULE, [*flags, "--resume", "--output_dir", resumed]))
    for name in ("actor", "actor_ema"):
        want, got = saved(straight / name), saved(resumed / name)
        assert max((want[k] - got[k]).abs().max() for k in want) <= 1e-5, name


@pytest.mark.slow
def test_two_processes_under_zero3(tmp_path):
    out = tmp_path / "z3_2p"
    proc = run_module(MODULE, [*QUICK, *LORA_FAST, "--actor_zero_stage", "3", "--critic_zero_stage", "3",
                               "--output_dir", out],
                      launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    finished(proc, out, folders=("actor", "actor_ema", "critic"))
    ema = saved(out / "actor_ema")
    assert all(torch.isfinite(v).all() for v in ema.values())
