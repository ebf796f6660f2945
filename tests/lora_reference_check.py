"""Step 3 with LoRA and --only_optimize_lora on real DeepSpeed engines; writes what it saw as JSON.

tests/test_step3_lora_fast.py starts this in a subprocess (DeepSpeed patches torch process-wide,
so engines must not live in the pytest process) and asserts on the JSON:

    python -m tests.lora_reference_check --zero_stage Z --out FILE

One DeepSpeedRLHFEngine (tiny-llama, fp32, critic-free: only the actor is trained) takes a few
optimizer steps, so its adapters move away from zero, its EMA being updated after each; then:
- loads: how many causal LMs the engine loaded (the actor alone), whether the reference's
  parameters are the actor's own tensors;
- ref_gap_{padded,packed}: the adapter-off reference's answer log-probs against those of a
  separately loaded frozen copy (the old path), and actor_gap: how far the actor is from both;
- optimizer: the numbers of the optimizer's Adam state against the adapters';
- ema_gap: the EMA against its fp32 definition computed by hand; swap_restored: the actor's
  adapters after saving actor_ema are exactly what they were; ema_saved_gap: the saved
  actor_ema against W + scaling * B_ema @ A_ema; resume_gap: a checkpointed EMA loaded back.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DECAY = 0.5
STEPS = 3


def flags(zero: int, out: Path) -> list[str]:
    return ["--actor_model_name_or_path", "tiny-llama", "--critic_model_name_or_path", "tiny-llama",
            "--actor_zero_stage", str(zero), "--dtype", "fp32", "--actor_lora_dim", "8",
            "--only_optimize_lora", "--actor_lora_learning_rate", "5e-2", "--enable_ema",
            "--ema_decay", str(DECAY), "--advantage", "rloo", "--samples_per_prompt", "2",
            "--reward_source", "checker", "--per_device_generation_batch_size", "4",
            "--per_device_training_batch_size", "4", "--num_warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--output_dir", str(out)]


def batch(vocab: int):
    """Left-padded prompts of 3..10 tokens, right-padded answers of 2..6 (ragged: packing matters)."""
    g = torch.Generator().manual_seed(0)
    prompt, answer = 10, 6
    seq = torch.randint(10, vocab, (4, prompt + answer), generator=g)
    prompts, answers = torch.tensor([10, 3, 7, 5]), torch.tensor([6, 2, 4, 5])
    cols = torch.arange(prompt + answer)
    mask = ((cols >= prompt - prompts[:, None]) & (cols < prompt + answers[:, None])).long()
    return seq.masked_fill(mask == 0, 0), mask, prompt


def whole(strategy, params: dict) -> dict:
    with strategy.gathered(list(params.values())):
        return {n: p.detach().float().clone() for n, p in params.items()}


def gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).abs()[mask.bool()].max())


def adam_state_numel(engine) -> int:
    """Elements of exp_avg in the innermost torch optimizer (ZeRO wraps it; its state is over
    ZeRO's flat fp32 partitions of what it was given)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return sum(st["exp_avg"].numel() for st in opt.state.values() if "exp_avg" in st)


def build(zero: int, work: Path):
    """The engine, and the paths of the causal LMs it loaded."""
    from training.step3_rlhf_finetuning import rlhf_engine
    from training.step3_rlhf_finetuning.config import Step3Config
    from utils.config import parse_config
    from utils.model import load_tokenizer
    loads = []
    real_load = rlhf_engine.load_causal_lm

    def counted(*args, **kwargs):
        loads.append(str(args[0]))
        return real_load(*args, **kwargs)
    rlhf_engine.load_causal_lm = counted
    cfg = parse_config(Step3Config, flags(zero, work))
    engine = rlhf_engine.DeepSpeedRLHFEngine("tiny-llama", "tiny-llama", load_tokenizer("tiny-llama"), cfg,
                                             num_total_iters=10)
    return engine, loads


def numel(params) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)


def sharing(engine, trainable: dict) -> dict:
    actor_ids = {id(p) for p in engine.actor.module.parameters()}
    ref_params = list(engine.ref.parameters())
    return {"critic": engine.critic is not None, "reward": engine.reward is not None,
            "ref_params_shared": bool(ref_params) and all(id(p) in actor_ids for p in ref_params),
            "ref_has_lora": any(".lora_" in n for n, _ in engine.ref.named_parameters()),
            "trainable_all_lora": all(".lora_" in n for n in trainable),
            "lora_numel": numel(trainable.values()), "model_numel": numel(engine.actor.module.parameters()),
            "ema_numel": engine.actor_ema.numel()}


def train(engine, trainable: dict, seq, mask, p: int) -> tuple[dict, dict]:
    """STEPS optimizer steps, the EMA updated after each: (the hand-computed fp32 EMA, the
    adapters now)."""
    from training.step3_rlhf_finetuning.scoring import answer_log_probs
    strategy, actor = engine.strategy, engine.actor
    hand = whole(strategy, trainable)
    actor.train()
    for _ in range(STEPS):
        loss = -answer_log_probs(actor, seq, mask, p, 1.0).sum()
        strategy.backward_and_step(actor, loss, loss)
        strategy.update_ema(actor, engine.actor_ema, DECAY)
        now = whole(strategy, trainable)
        hand = {n: DECAY * hand[n] + (1 - DECAY) * now[n] for n in hand}
    return hand, now


def reference(engine, zero: int, seq, mask, p: int) -> dict:
    """The adapter-off reference against a separately loaded frozen copy (the old path), with
    the actor left in training mode as the rollout finds it."""
    from training.step3_rlhf_finetuning.scoring import answer_log_probs
    from utils.model import packed_forward
    actor, old, report = engine.actor, engine._init_frozen_actor_copy(zero, offload=False), {}
    for kind, pack in (("padded", False), ("packed", True)):
        got = answer_log_probs(engine.ref, seq, mask, p, 0.7, pack=pack)
        want = answer_log_probs(old, seq, mask, p, 0.7, pack=pack)
        with torch.no_grad():
            actor.eval()
            mine = answer_log_probs(actor, seq, mask, p, 0.7, pack=pack)
            actor.train()
        report[f"ref_gap_{kind}"] = gap(got, want, mask[:, p:])
        report[f"actor_gap_{kind}"] = gap(mine, want, mask[:, p:])
        report[f"ref_requires_grad_{kind}"] = got.requires_grad
    report["actor_training_after_ref"] = actor.training
    report["ref_packs"] = packed_forward.decision(engine.ref)
    report["old_packs"] = packed_forward.decision(old)
    return report


def export(engine, trainable: dict, now: dict) -> dict:
    """actor_ema as saving.py exports it: the averaged adapters swapped in, merged, and the
    actor's own back exactly."""
    from training.step3_rlhf_finetuning.saving import _exported
    from utils.model import lora_scaling
    from utils.strategy.export import hf_state_dict
    strategy, ema = engine.strategy, engine.actor_ema
    before = whole(strategy, trainable)
    with _exported(ema, engine) as exported:
        _, saved = hf_state_dict(exported)
    after = whole(strategy, trainable)
    scaling = lora_scaling(engine.actor.module)
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    base = whole(strategy, {"w": engine.actor.module.get_parameter(f"{stem}.base_layer.weight")})["w"].cpu()

    def merged(factors: dict) -> torch.Tensor:
        return base + scaling * factors[f"{stem}.lora_B.default.weight"].cpu() @ factors[f"{stem}.lora_A.default.weight"].cpu()
    want = merged(ema.average)
    return {"swap_restored": all(torch.equal(before[n], after[n]) for n in before),
            "ema_saved_gap": float((saved["model.layers.0.self_attn.q_proj.weight"].float() - want).abs().max()),
            "ema_saved_differs_from_actor": float((want - merged(now)).abs().max())}


def resume(engine, folder: Path) -> dict:
    """A checkpointed EMA, moved and loaded back: bit for bit what was saved."""
    strategy, ema = engine.strategy, engine.actor_ema
    folder.mkdir(parents=True, exist_ok=True)
    strategy.save_engine(ema, folder, "actor_ema")
    saved_state = ema.state_dict()
    strategy.update_ema(engine.actor, ema, 0.0)  # move it (to the actor) before loading back
    strategy.load_engine(ema, folder, "actor_ema")
    return {"resume_equal": all(torch.equal(ema.average[n].cpu(), saved_state[n]) for n in saved_state),
            "checkpoint_bytes": (folder / "actor_ema.safetensors").stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero_stage", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    engine, loads = build(a.zero_stage, a.out.parent / f"work-z{a.zero_stage}")
    actor = engine.actor
    trainable = {n: p for n, p in actor.module.named_parameters() if p.requires_grad}
    report = {"loads": len(loads), **sharing(engine, trainable)}
    seq, mask, p = batch(actor.module.config.vocab_size)
    hand, now = train(engine, trainable, seq, mask, p)
    ema = engine.actor_ema
    report["adam_state_numel"] = adam_state_numel(actor)
    report["ema_gap"] = max(float((ema.average[n].cpu() - hand[n].cpu()).abs().max()) for n in hand)
    report["ema_moved"] = max(float((ema.average[n].cpu() - now[n].cpu()).abs().max()) for n in hand)
    report.update(reference(engine, a.zero_stage, seq, mask, p))
    report.update(export(engine, trainable, now))
    report.update(resume(engine, a.out.parent / f"ckpt-z{a.zero_stage}"))
    a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
