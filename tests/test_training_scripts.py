"""Every example script's command line parses with its step's flags (no typo'd or removed flag)."""
from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest

from tests.helpers import assert_ok, deepspeed_on_a_free_port
from utils.config import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(ROOT.glob("training/*/training_scripts/*/*.sh"))
CONFIGS = {"training.step1_supervised_finetuning.main": "SFTConfig",
           "training.step2_reward_model_finetuning.main": "RewardConfig",
           "training.step2_dpo_finetuning.main": "DPOConfig",
           "training.step3_rlhf_finetuning.main": "Step3Config"}


def command(script: Path) -> tuple[str, list[str]]:
    """(module, its arguments) of the python/deepspeed line of a script."""
    text = script.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        for flag in ("--module", "-m"):
            if flag in words and words[words.index(flag) + 1] in CONFIGS:
                i = words.index(flag)
                return words[i + 1], words[i + 2:]
    raise AssertionError(f"{script}: no step command found")


def test_there_are_scripts_for_every_step_and_deployment():
    found = {(p.parts[-4], p.parts[-2]) for p in (s.relative_to(ROOT) for s in SCRIPTS)}
    for step in ("step1_supervised_finetuning", "step2_reward_model_finetuning", "step3_rlhf_finetuning"):
        for deployment in ("single_gpu", "single_node", "multi_node", "cpu"):
            assert (step, deployment) in found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT / "training")))
def test_script_flags_parse(script):
    module, args = command(script)
    config_cls = getattr(importlib.import_module(module), CONFIGS[module])
    namespace = build_parser(config_cls).parse_args(args)  # exits (SystemExit) on an unknown flag
    assert namespace.output_dir


LORA = (("lora_dim", "lora_alpha", "lora_learning_rate"),  # (rank, alpha, LoRA learning rate) flags
        ("actor_lora_dim", "actor_lora_alpha", "actor_lora_learning_rate"),
        ("critic_lora_dim", "critic_lora_alpha", "critic_lora_learning_rate"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT / "training")))
def test_lora_scripts_fit_the_scale(script):
    """The update of a LoRA step is about learning rate x alpha / rank: DeepSpeed-Chat's 5e-4 is
    tuned for its scale 1/rank, so a script here must not exceed learning rate x alpha = 5e-4
    (e.g. alpha 1 with 5e-4; the default alpha = rank would be rank times further)."""
    module, args = command(script)
    namespace = build_parser(getattr(importlib.import_module(module), CONFIGS[module])).parse_args(args)
    for rank, alpha, lr in LORA:
        if getattr(namespace, rank, 0) > 0:
            alpha_value = getattr(namespace, alpha) or getattr(namespace, rank)
            assert getattr(namespace, lr) * alpha_value <= 5e-4 * 1.001, (rank, alpha_value)


TINY_CPU = sorted(ROOT.glob("training/*/training_scripts/cpu/run_tiny.sh"))


@pytest.mark.parametrize("script", TINY_CPU, ids=lambda p: p.parts[-4])
def test_cpu_tiny_script_runs(script, tmp_path):
    """The CPU example scripts are run, not only parsed (the SmolLM2 ones take minutes: parsed)."""
    import subprocess

    out = tmp_path / "out"
    env = deepspeed_on_a_free_port(tmp_path / "bin")  # the scripts' launcher would take port 29500
    proc = subprocess.run(["bash", str(script), str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**env, "PYTHONUNBUFFERED": "1"})
    assert_ok(proc)
    model = out / "actor" if "step3" in script.parts[-4] else out
    assert (model / "training_summary.json").is_file() and (model / "model.safetensors").is_file()


def test_every_step_has_a_tiny_cpu_script():
    assert {p.parts[-4] for p in TINY_CPU} == {
        "step1_supervised_finetuning", "step2_reward_model_finetuning", "step3_rlhf_finetuning"}
