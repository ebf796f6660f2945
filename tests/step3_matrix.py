"""Step 3 with its invariants measured from the inside (used by tests/test_matrix.py).

    python -m tests.step3_matrix --report FILE <Step 3 flags>     (or deepspeed --module ...)

Runs Step 3 (training.step3_rlhf_finetuning.loop.run) with probes wrapped around three of the
loop's calls, and writes what they measured to FILE as JSON (rank 0):
- update_ema: before each EMA update, the actor's weights (gathered, LoRA merged in fp32) move a
  hand-computed fp32 EMA, ema <- d * ema + (1 - d) * actor, started from the EMA engine's own
  weights; `ema_max_error` is the largest difference from the EMA engine's weights at the end.
  With LoRA and --only_optimize_lora the EMA is over the actor's trainable parameters (the
  adapters: utils.ema.TrainableEMA), and so is the hand-computed one.
- rollout (generate_experience): with critic-free advantages, every prompt whose answers' scores tie must
  get exactly the advantage of its KL part alone (0 when the KL is a loss term);
  `tied_groups` counts them and `tied_max_advantage` is the largest score-part left.
- save_models: each trained engine's optimizer steps, its scheduler's steps and the total the
  schedule was built for; then the final weights in the saved dtype, compared after the run
  with the folders reloaded through transformers (`reload_max_error`).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from training.step3_rlhf_finetuning import loop, ppo_trainer
from training.step3_rlhf_finetuning.saving import _exported
from training.step3_rlhf_finetuning.main import Step3Config
from utils import dist
from utils.ema import TrainableEMA
from utils.strategy import DeepSpeedStrategy
from utils.config import parse_config
from utils.rl_math import group_residuals, masked_sum

REPORT: dict = {"ema_updates": 0, "tied_groups": 0, "tied_max_advantage": 0.0, "groups": 0}
ENGINE: dict = {}


def fp32_state(engine) -> dict | None:
    """The engine's plain HF weights in fp32, LoRA merged in fp32 (rank 0; collective)."""
    exported = DeepSpeedStrategy.hf_state_dict(engine, torch.float32)
    return None if exported is None else exported[1]


def ema_state(engine) -> dict | None:
    """What the EMA averages, in fp32 (rank 0; collective): the actor's merged weights, or with
    LoRA and --only_optimize_lora (utils.ema.TrainableEMA) the actor's trainable parameters."""
    if isinstance(engine.actor_ema, TrainableEMA):
        return engine.actor_ema.state_dict() if dist.is_main() else None
    return fp32_state(engine.actor_ema)


def followed_by_ema(engine) -> dict | None:
    """The actor's values that the next EMA update averages in (rank 0; collective)."""
    if isinstance(engine.actor_ema, TrainableEMA):
        params = engine.actor_ema.params
        with DeepSpeedStrategy.gathered(list(params.values())):
            return {n: p.detach().float().cpu().clone() for n, p in params.items()}
    return fp32_state(engine.actor)


def probe_engine():
    class Recorded(loop.DeepSpeedRLHFEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ENGINE["engine"] = self
    loop.DeepSpeedRLHFEngine = Recorded


def probe_ema():
    real = DeepSpeedStrategy.update_ema

    def update_ema(self, actor, ema, decay):
        engine = ENGINE["engine"]
        actor_now = followed_by_ema(engine)
        if dist.is_main():
            hand = ENGINE["ema"]
            ENGINE["ema"] = {k: decay * v + (1 - decay) * actor_now[k] for k, v in hand.items()}
        REPORT["ema_updates"] += 1
        real(self, actor, ema, decay)
    DeepSpeedStrategy.update_ema = update_ema


def probe_advantages(cfg):
    real = ppo_trainer.DeepSpeedPPOTrainer.rollout

    def rollout(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        exp = out.experience
        if cfg.ppo.advantage == "gae":
            return out
        k = cfg.generation.samples_per_prompt
        scores = exp.scores.view(-1, k)
        kl_part = torch.zeros_like(exp.scores)
        if not cfg.ppo.kl_in_loss:
            kl_returns = -self.kl_coef * masked_sum(exp.log_probs - exp.ref_log_probs, exp.action_mask, 1)
            kl_part = group_residuals(kl_returns, k, cfg.ppo.advantage)
        score_part = (exp.advantages - kl_part.unsqueeze(1)) * exp.action_mask
        tied = scores.amax(1) == scores.amin(1)
        REPORT["groups"] += len(tied)
        REPORT["tied_groups"] += int(tied.sum())
        if tied.any():
            left = score_part.view(-1, k, score_part.size(1))[tied].abs().max().item()
            REPORT["tied_max_advantage"] = max(REPORT["tied_max_advantage"], left)
        return out
    ppo_trainer.DeepSpeedPPOTrainer.rollout = rollout


def probe_save():
    real = loop.save_models

    def save_models(engine, tokenizer, cfg, summary):
        for name, model, scheduler in (("actor", engine.actor, engine.actor_scheduler),
                                       ("critic", engine.critic, engine.critic_scheduler)):
            if model is not None:
                REPORT[f"{name}_optimizer_steps"] = int(model.global_steps)
                REPORT[f"{name}_scheduler_steps"] = int(scheduler.last_epoch)
        REPORT["planned_optimizer_steps"] = int(engine.num_total_iters)
        REPORT["lr_actor_end"] = engine.actor_scheduler.get_last_lr()[0]
        # where each engine keeps its parameters: the EMA must be placed like the actor
        # (an adapter EMA is not an engine: its averages sit beside the actor's adapters)
        REPORT["parameter_device"] = {
            name: str(getattr(model.zero_offload_param(), "device", "none") if model.zero_optimization_stage() == 3
                      else "none")
            for name, model in (("actor", engine.actor), ("actor_ema", engine.actor_ema))
            if model is not None and not isinstance(model, TrainableEMA)}
        REPORT["ema_dtype"] = (None if engine.actor_ema is None else str(next(iter(engine.actor_ema.average.values())).dtype)
                               if isinstance(engine.actor_ema, TrainableEMA) else
                               str(next(engine.actor_ema.module.parameters()).dtype))
        finals = {"actor": DeepSpeedStrategy.hf_state_dict(engine.actor)}
        if engine.critic is not None:
            finals["critic"] = DeepSpeedStrategy.hf_state_dict(engine.critic)
        if engine.actor_ema is not None:
            ema = ema_state(engine)
            if dist.is_main():
                REPORT["ema_max_error"] = max((ema[k] - v).abs().max().item() for k, v in ENGINE["ema"].items())
                REPORT["ema_moved"] = max((ema[k] - v.float()).abs().max().item()
                                          for k, v in ENGINE["ema_start"].items())
            with _exported(engine.actor_ema, engine) as exported:  # the engine saving.py saves
                finals["actor_ema"] = DeepSpeedStrategy.hf_state_dict(exported, engine.torch_dtype)
        ENGINE["finals"] = finals
        real(engine, tokenizer, cfg, summary)
    loop.save_models = save_models


def probe_start():
    """The actor's weights when training starts (after a resume: the checkpoint's)."""
    real = loop.RunCheckpoints.start

    def start(self, logger):
        out = real(self, logger)
        engine = ENGINE["engine"]
        if engine.actor_ema is not None:
            ENGINE["ema_start"] = followed_by_ema(engine)
            ENGINE["ema"] = ema_state(engine)
        return out
    loop.RunCheckpoints.start = start


def reload_errors(out: Path, finals: dict) -> dict:
    """Largest difference between each saved folder, loaded as users load it, and the final
    weights in the saved dtype (0 when the save is exact)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    errors = {}
    for name, (_, state) in finals.items():
        auto = AutoModelForSequenceClassification if name == "critic" else AutoModelForCausalLM
        loaded = auto.from_pretrained(out / name, dtype="auto").state_dict()
        errors[name] = max((loaded[k].float() - v.float()).abs().max().item() for k, v in state.items())
        assert all(loaded[k].dtype == v.dtype for k, v in state.items()), name
    return errors


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    at = argv.index("--report")
    report_path = Path(argv[at + 1])
    del argv[at:at + 2]
    cfg = parse_config(Step3Config, argv)
    probe_engine()
    probe_ema()
    probe_advantages(cfg)
    probe_save()
    probe_start()
    loop.run(cfg)
    if os.environ.get("RANK", "0") == "0":  # the process group is gone: dist.rank() says 0 everywhere
        REPORT["reload_max_error"] = reload_errors(Path(cfg.output_dir), ENGINE["finals"])
        report_path.write_text(json.dumps(REPORT, indent=2))


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
