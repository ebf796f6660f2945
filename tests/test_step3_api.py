"""Step 3's parts on their own: the typed config and its flat (DeepSpeed-Chat) names, the
reward-source interface, the train_rlhf record, and DeepSpeed-Chat's API driven with a flat
argparse namespace as its scripts build."""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import ROOT, assert_ok
from training.step1_supervised_finetuning.main import SFTConfig
from training.step3_rlhf_finetuning.config import (STEP3_FLAGS, EngineConfig, Step3Config, as_step3_config,
                                                   config_record)
from training.step3_rlhf_finetuning.rewards import (CheckerSource, FunctionSource, RewardModelSource, reward_source,
                                                    score_answers)
from training.step3_rlhf_finetuning.update import TrainStats
from utils.config import build_parser, flag_table, parse_config, resolve, to_flat
from utils.data import bundled
from utils.model import load_tokenizer
from utils.upstream_flags import STEP3, flags_for

# ------------------------------------------------------------------ config


def test_every_alias_names_an_existing_field_and_every_field_has_one():
    cfg = Step3Config()
    leaves = set()

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            if not f.init:  # set by the run, not a flag (DataConfig.data_format)
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                leaves.add(prefix + f.name)
    walk(cfg)
    assert set(STEP3_FLAGS.values()) == leaves and len(STEP3_FLAGS) == len(leaves)
    for path in STEP3_FLAGS.values():
        resolve(cfg, path)  # exists
    for flag in flags_for(STEP3, set(STEP3_FLAGS)):  # DeepSpeed-Chat's renamed flags land on a field too
        assert not flag.to or flag.to in STEP3_FLAGS, flag.name
    assert STEP3_FLAGS["actor_zero_stage"] == "actor.zero_stage"
    assert STEP3_FLAGS["critic_lora_learning_rate"] == "critic.lora_learning_rate"
    assert STEP3_FLAGS["kl_ctl"] == "ppo.kl_ctl" and STEP3_FLAGS["temperature"] == "generation.temperature"


def test_flat_flags_fill_the_typed_parts():
    cfg = parse_config(Step3Config, ["--actor_zero_stage", "3", "--critic_lora_dim", "8", "--actor_learning_rate",
                                     "1e-3", "--kl_ctl", "0.5", "--top_k", "4", "--unsupervised_dataset_name",
                                     "bundled", "--no-enable_hybrid_engine", "--output_dir", "/tmp/x"])
    assert isinstance(cfg.actor, EngineConfig) and cfg.actor.zero_stage == 3 and cfg.critic.zero_stage == 0
    assert cfg.critic.lora_dim == 8 and cfg.actor.learning_rate == 1e-3 and cfg.critic.learning_rate == 5e-6
    assert cfg.ppo.kl_ctl == 0.5 and cfg.generation.top_k == 4 and cfg.ptx.enabled
    assert not cfg.hybrid.enable_hybrid_engine
    record = config_record(cfg)  # training_config.json: a readable nested dict
    assert record["actor"]["zero_stage"] == 3 and record["ppo"]["kl_ctl"] == 0.5 and record["seed"] == 1234


def test_the_parser_of_a_flat_config_is_its_fields():
    assert set(flag_table(SFTConfig)) == {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    assert all(name == path for name, path in flag_table(SFTConfig).items())


def test_a_deepspeed_chat_namespace_round_trips():
    """A flat namespace with every Step 3 flag (as DeepSpeed-Chat's parse_args gives, plus names
    it has and we do not) converts to the typed config and back to the same values."""
    changed = {}
    for flat, value in to_flat(Step3Config()).items():
        changed[flat] = (not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float))
                         and value is not None else value)
    changed["actor_zero_stage"], changed["critic_zero_stage"] = 3, 2
    ns = argparse.Namespace(**changed, enable_mixed_precision_lora=False, end_of_conversation_token="<|endoftext|>")
    cfg = as_step3_config(ns)
    assert to_flat(cfg) == changed
    assert cfg.actor.zero_stage == 3 and cfg.critic.zero_stage == 2 and cfg.ppo.kl_ctl == changed["kl_ctl"]
    assert as_step3_config(cfg) is cfg


def test_deepspeed_chat_older_names_in_a_namespace():
    ns = argparse.Namespace(per_device_train_batch_size=8, per_device_mini_train_batch_size=4,
                            disable_actor_dropout=True, disable_critic_dropout=False, actor_dropout=None,
                            actor_lora_dim=16, actor_learning_rate=5e-4)
    cfg = as_step3_config(ns)
    assert (cfg.per_device_generation_batch_size, cfg.per_device_training_batch_size) == (8, 4)
    assert cfg.actor.dropout == 0.0 and cfg.critic.dropout == 0.0 and cfg.actor.lora_dim == 16
    assert cfg.actor.learning_rate == 5e-4 and cfg.critic.learning_rate == 5e-6  # the rest: our defaults


def test_help_lists_every_flag_once():
    text = build_parser(Step3Config).format_help()
    for flat in STEP3_FLAGS:
        assert f"--{flat} " in text or f"--{flat}," in text or f"--{flat}\n" in text, flat


# ------------------------------------------------------------------ reward sources


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def rollout_tensors(tok, prompts: list[str], answers: list[str]):
    """(prompts (B, P) left-padded, seq, attention_mask, action_mask) as a rollout lays them out."""
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    a_ids = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
    p_len, a_len, pad = max(map(len, p_ids)), max(map(len, a_ids)), tok.pad_token_id
    prompt = torch.tensor([[pad] * (p_len - len(x)) + x for x in p_ids])
    answer = torch.tensor([x + [pad] * (a_len - len(x)) for x in a_ids])
    action = torch.tensor([[1] * len(x) + [0] * (a_len - len(x)) for x in a_ids], dtype=torch.bool)
    attention = torch.cat([prompt != pad, action], 1).long()
    return prompt, torch.cat([prompt, answer], 1), attention, action


def test_the_checker_source_scores_like_the_bundled_checker(tokenizer):
    examples = bundled.generate_examples(12, seed=3)
    prompts = [ex["prompt"] for ex in examples]
    answers = [ex["chosen"] if i % 2 else ex["rejected"] for i, ex in enumerate(examples)]
    tensors = rollout_tensors(tokenizer, prompts, answers)
    got = score_answers(CheckerSource(tokenizer), *tensors)
    want = bundled.score_batch(prompts, answers)
    assert got.dtype == torch.float32 and got.shape == (12,)
    assert got.tolist() == pytest.approx(want) and len(set(want)) > 1


def test_the_checker_and_ground_truth_follow_the_task_family(tokenizer):
    """--data_path bundled-constraints: the checker source and gt_score grade with that family's
    checker, and Step 3's config accepts the checker there (and refuses a plain file)."""
    from training.step3_rlhf_finetuning.config import Step3Config
    from training.step3_rlhf_finetuning.rewards import ground_truth_for
    from utils.config import parse_config
    from utils.data import constraints, tasks
    examples = constraints.generate_examples(12, seed=3)
    prompts = [f" Human: {ex['prompt']} Assistant:" for ex in examples]
    answers = [ex["chosen"] if i % 2 else ex["rejected"] for i, ex in enumerate(examples)]
    family = tasks.family_of(["bundled-constraints"])
    got = score_answers(CheckerSource(tokenizer, family), *rollout_tensors(tokenizer, prompts, answers))
    want = constraints.score_batch(prompts, answers)
    assert got.tolist() == pytest.approx(want) and len(set(want)) > 1
    assert ground_truth_for(["bundled-constraints"], tokenizer).family is family
    assert ground_truth_for(["bundled", "bundled-constraints"], tokenizer) is None  # two families: no one truth
    parse_config(Step3Config, ["--reward_source", "checker", "--data_path", "bundled-constraints"])


def test_a_reward_of_the_wrong_length_is_an_error(tokenizer):
    tensors = rollout_tensors(tokenizer, ["What is 2 + 2?"] * 3, ["4"] * 3)
    for wrong in (torch.zeros(4), torch.zeros(3, 1), torch.zeros(())):
        with pytest.raises(ValueError, match=r"one score per answer, shape \(3,\)"):
            score_answers(FunctionSource(lambda *_: wrong), *tensors)
    assert score_answers(FunctionSource(lambda *_: [1.0, 2.0, 3.0]), *tensors).tolist() == [1.0, 2.0, 3.0]


def test_what_scores_a_trainer_s_rollouts():
    fn = FunctionSource(lambda *_: torch.zeros(1))
    assert reward_source(fn, object()) is fn
    assert isinstance(reward_source(lambda *_: torch.zeros(1), None), FunctionSource)
    assert isinstance(reward_source(None, object()), RewardModelSource)
    with pytest.raises(ValueError, match="no reward model"):
        reward_source(None, None)


def test_train_rlhf_stats_unpack_as_deepspeed_chat_expects():
    stats = TrainStats(torch.tensor(1.5), torch.tensor(0.5), entropy=2.0, policy_shift=0.0, skipped=False)
    actor_loss, critic_loss = stats
    assert (actor_loss.item(), critic_loss.item()) == (1.5, 0.5) and stats.entropy == 2.0


# ------------------------------------------------------------------ DeepSpeed-Chat's API, end to end

API_SCRIPT = textwrap.dedent("""
    import argparse
    from training.step3_rlhf_finetuning.ppo_trainer import (DeepSpeedPPOTrainer, DeepSpeedPPOTrainerUnsupervised,
                                                            Experience)
    from training.step3_rlhf_finetuning.rlhf_engine import DeepSpeedRLHFEngine
    from utils.data import DataCollatorPrompt, DataCollatorSFT, bundled
    from utils.model import load_tokenizer

    # no process group yet: the engine starts one (DeepSpeed-Chat's scripts start it themselves)
    # flat, as DeepSpeed-Chat's step 3 parse_args builds it (a subset: the rest take our defaults)
    args = argparse.Namespace(
        actor_zero_stage=2, critic_zero_stage=2, actor_lora_dim=0, critic_lora_dim=0, actor_learning_rate=1e-3,
        critic_learning_rate=1e-3, actor_weight_decay=0.0, critic_weight_decay=0.0, actor_dropout=None,
        disable_actor_dropout=True, offload=False, dtype="fp32", per_device_generation_batch_size=2,
        per_device_training_batch_size=2, gradient_accumulation_steps=1, max_prompt_seq_len=32,
        max_answer_seq_len=6, num_warmup_steps=0, enable_hybrid_engine=True, enable_ema=False,
        unsup_coef=27.8, end_of_conversation_token="<|endoftext|>")
    tok = load_tokenizer("tiny-llama")
    engine = DeepSpeedRLHFEngine(actor_model_name_or_path="tiny-llama", critic_model_name_or_path="tiny-llama",
                                 tokenizer=tok, num_total_iters=4, args=args)
    examples = bundled.generate_examples(2, seed=1)
    batch = DataCollatorPrompt(tok.pad_token_id)([{"prompt_input_ids": tok(e["prompt"])["input_ids"]}
                                                  for e in examples])
    for cls in (DeepSpeedPPOTrainer, DeepSpeedPPOTrainerUnsupervised):
        trainer = cls(engine=engine, args=args)
        exp = trainer.generate_experience(batch["prompt"], batch["prompt_att_mask"], 0)
        assert isinstance(exp, Experience) and len(exp) == 2
        actor_loss, critic_loss = trainer.train_rlhf(exp)
        print("losses", cls.__name__, actor_loss.item(), critic_loss.item())
        if cls is DeepSpeedPPOTrainerUnsupervised:
            text = tok(examples[0]["prompt"] + " " + examples[0]["chosen"])["input_ids"]
            unsup = DataCollatorSFT(tok.pad_token_id)([{"input_ids": text, "labels": text}])
            print("unsup", trainer.train_unsupervised(unsup, 27.8).item())
    print("steps", engine.actor.global_steps, engine.critic.global_steps)
""")


def test_deepspeed_chat_api_with_a_flat_namespace(tmp_path):
    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    assert_ok(proc)
    assert "losses DeepSpeedPPOTrainer " in proc.stdout and "losses DeepSpeedPPOTrainerUnsupervised" in proc.stdout
    assert "unsup " in proc.stdout and "steps 2 2" in proc.stdout  # one actor step each: ptx joined PPO's
