"""The five models of Step 3, each a DeepSpeed engine.

actor      trained policy (the Step 1 model), `--actor_zero_stage`, LoRA optional
reference  frozen copy of the starting actor, for the KL penalty; ZeRO-3-sharded when the
           actor is, or with `--offload_reference_model` its parameters kept in CPU memory.
           With LoRA and --only_optimize_lora (`lora_only`) no copy: the actor itself with its
           adapters off (utils.model.AdapterOffReference), its base being the starting actor
actor_ema  (`--enable_ema`) moving average of the actor, the model often worth keeping; with
           `lora_only` an fp32 average of the adapters alone (utils.ema.TrainableEMA)
critic     trained value model, initialized from the reward model, `--critic_zero_stage`;
           None with a critic-free `--advantage` (rloo, grpo): not loaded, not saved
reward     frozen reward model (the Step 2 output), `--offload_reward_model`; None with
           `--reward_source checker` (the answers are scored by the task's checker instead) and
           with `--reward_fn` unless --reward_model_name_or_path or --reward_source model is given

All five exchange token ids, so every tokenizer must equal the actor's: checked first, before
any model is loaded. Every engine is built by the run's DeepSpeedStrategy (`strategy`; one is
made from `args` when not given, as DeepSpeed-Chat's scripts construct the engine directly).
"""
from __future__ import annotations

from training.step3_rlhf_finetuning.config import EngineConfig, Step3Config, as_step3_config
from utils.dist import current_device, is_main
from utils.ema import TrainableEMA, ema_placement
from utils.model import (AdapterOffReference, apply_lora, load_causal_lm, load_reward_model, require_same_tokenizer,
                         resolve_model_path)
from utils.strategy import DeepSpeedStrategy, TrainSpec


class DeepSpeedRLHFEngine:
    """`args`: a Step3Config, or a flat namespace as DeepSpeed-Chat's scripts build
    (as_step3_config)."""

    def __init__(self, actor_model_name_or_path: str, critic_model_name_or_path: str, tokenizer,
                 args, num_total_iters: int, reward_model_name_or_path: str | None = None,
                 strategy: DeepSpeedStrategy | None = None):
        self.args = cfg = as_step3_config(args)
        if strategy is None:
            strategy = DeepSpeedStrategy(cfg.dtype, cfg.deepspeed_config)
            strategy.setup_distributed()
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.num_total_iters = num_total_iters
        self.actor_path = resolve_model_path(actor_model_name_or_path)
        self.uses_reward_model = cfg.uses_reward_model
        self.uses_critic = cfg.ppo.uses_critic
        # paths of models not used are not resolved: they need not exist
        self.critic_path = resolve_model_path(critic_model_name_or_path) if self.uses_critic else None
        self.reward_path = (resolve_model_path(reward_model_name_or_path or critic_model_name_or_path)
                            if self.uses_reward_model else None)
        for role, path in (("critic", self.critic_path), ("reward model", self.reward_path)):
            if path is not None and path != self.actor_path:
                require_same_tokenizer(tokenizer, path, role, f"the actor ({actor_model_name_or_path})",
                                       cfg.trust_remote_code)
        self.device = current_device()
        self.torch_dtype = strategy.torch_dtype

        # only the adapters train: the base is the starting actor, so it is the reference
        self.lora_only = cfg.actor.lora_dim > 0 and cfg.only_optimize_lora
        self.actor, self.actor_scheduler = self._init_actor(cfg.actor)
        self.ref = self._init_reference(cfg)
        self.actor_ema = self._init_ema(cfg.actor.zero_stage) if cfg.ppo.enable_ema else None
        self.critic, self.critic_scheduler = self._init_critic(cfg.critic) if self.uses_critic else (None, None)
        self.reward = self._init_reward(cfg.critic.zero_stage) if self.uses_reward_model else None

    # A micro-batch of the frozen engines is a whole generation batch (they only score it).
    def _frozen(self, model, zero_stage: int, offload: bool, dtype: str | None = None):
        return self.strategy.prepare_frozen(model, zero_stage=zero_stage, offload=offload, dtype=dtype,
                                            micro_batch=self.args.per_device_generation_batch_size)

    def _trained(self, model, part: EngineConfig):
        a: Step3Config = self.args
        return self.strategy.prepare_trained(model, TrainSpec(
            lr=part.learning_rate, weight_decay=part.weight_decay, lora_lr=part.lora_learning_rate,
            zero_stage=part.zero_stage, offload=a.offload, micro_batch=a.per_device_training_batch_size,
            grad_accum=a.gradient_accumulation_steps, grad_clip=a.max_grad_norm, scheduler=a.lr_scheduler_type,
            warmup_steps=a.num_warmup_steps, total_steps=self.num_total_iters))

    def _init_actor(self, part: EngineConfig):
        model = load_causal_lm(self.actor_path, self.tokenizer, dtype=self.torch_dtype,
                               dropout=part.dropout, trust_remote_code=self.args.trust_remote_code,
                               gradient_checkpointing=part.gradient_checkpointing)
        if part.lora_dim > 0:
            model = apply_lora(model, part.lora_dim, part.lora_module_name, part.lora_alpha,
                               only_optimize_lora=self.args.only_optimize_lora, role="actor")
        return self._trained(model, part)

    def _init_reference(self, cfg: Step3Config):
        if not self.lora_only:
            return self._init_frozen_actor_copy(cfg.actor.zero_stage, offload=cfg.offload_reference_model)
        if cfg.offload_reference_model and is_main():
            print("--offload_reference_model: nothing to place, the reference is the actor with its LoRA "
                  "adapters off (--only_optimize_lora), placed as the actor is (--offload)", flush=True)
        return AdapterOffReference(self.actor)

    def _init_frozen_actor_copy(self, zero_stage: int, offload: bool):
        """Reference or EMA: the starting actor weights, sharded like the actor under ZeRO-3."""
        model = load_causal_lm(self.actor_path, self.tokenizer, dtype=self.torch_dtype, dropout=0.0,
                               trust_remote_code=self.args.trust_remote_code)
        return self._frozen(model, zero_stage, offload)

    def _init_ema(self, actor_zero_stage: int):
        """The actor's starting weights as loaded, kept in fp32 (see utils/ema.py), partitioned
        and placed like the actor's parameters (ema_placement); with `lora_only` the adapters'
        current values alone, in fp32."""
        if self.lora_only:
            return TrainableEMA(self.actor.module, gathered=self.strategy.gathered)
        model = load_causal_lm(self.actor_path, self.tokenizer, dtype=self.torch_dtype, dropout=0.0,
                               trust_remote_code=self.args.trust_remote_code).float()
        zero_stage, offload = ema_placement(actor_zero_stage, self.args.offload)
        return self._frozen(model, zero_stage, offload, dtype="fp32")

    def _init_critic(self, part: EngineConfig):
        model = load_reward_model(self.critic_path, self.tokenizer, dtype=self.torch_dtype,
                                  dropout=part.dropout, trust_remote_code=self.args.trust_remote_code,
                                  gradient_checkpointing=part.gradient_checkpointing)
        if part.lora_dim > 0:
            model.hf_model = apply_lora(model.hf_model, part.lora_dim, part.lora_module_name,
                                        part.lora_alpha, only_optimize_lora=self.args.only_optimize_lora,
                                        role="critic")
            model.hf_model.score.weight.requires_grad_(True)  # the value head always trains
        return self._trained(model, part)

    def _init_reward(self, critic_zero_stage: int):
        model = load_reward_model(self.reward_path, self.tokenizer, dtype=self.torch_dtype, dropout=0.0,
                                  trust_remote_code=self.args.trust_remote_code)
        return self._frozen(model, critic_zero_stage, self.args.offload_reward_model)
