"""The five models of Step 3, each a DeepSpeed engine.

actor      trained policy (the Step 1 model), `--actor_zero_stage`, LoRA optional
reference  frozen copy of the starting actor, for the KL penalty; ZeRO-3-sharded when the
           actor is, or with `--offload_reference_model` its parameters kept in CPU memory
actor_ema  (`--enable_ema`) moving average of the actor, the model often worth keeping
critic     trained value model, initialized from the reward model, `--critic_zero_stage`;
           None with a critic-free `--advantage` (rloo, grpo): not loaded, not saved
reward     frozen reward model (the Step 2 output), `--offload_reward_model`; None with
           `--reward_source checker` (the answers are scored by the task's checker instead)

All five exchange token ids, so every tokenizer must equal the actor's: checked first, before
any model is loaded. Every engine is built by the run's DeepSpeedStrategy (`strategy`; one is
made from `args` when not given, as DeepSpeed-Chat's scripts construct the engine directly).
"""
from __future__ import annotations


from utils.dist import current_device
from utils.ema import ema_placement
from utils.model import (apply_lora, load_causal_lm, load_reward_model, require_same_tokenizer,
                         resolve_model_path)
from utils.strategy import DeepSpeedStrategy, TrainSpec


class DeepSpeedRLHFEngine:
    def __init__(self, actor_model_name_or_path: str, critic_model_name_or_path: str, tokenizer,
                 args, num_total_iters: int, reward_model_name_or_path: str | None = None,
                 strategy: DeepSpeedStrategy | None = None):
        if strategy is None:
            strategy = DeepSpeedStrategy(args.dtype, args.deepspeed_config)
            strategy.setup_distributed()
        self.strategy = strategy
        self.args = args
        self.tokenizer = tokenizer
        self.num_total_iters = num_total_iters
        self.actor_path = resolve_model_path(actor_model_name_or_path)
        self.uses_reward_model = getattr(args, "reward_source", "model") == "model"
        self.uses_critic = getattr(args, "advantage", "gae") == "gae"
        # paths of models not used are not resolved: they need not exist
        self.critic_path = resolve_model_path(critic_model_name_or_path) if self.uses_critic else None
        self.reward_path = (resolve_model_path(reward_model_name_or_path or critic_model_name_or_path)
                            if self.uses_reward_model else None)
        for role, path in (("critic", self.critic_path), ("reward model", self.reward_path)):
            if path is not None and path != self.actor_path:
                require_same_tokenizer(tokenizer, path, role, f"the actor ({actor_model_name_or_path})",
                                       args.trust_remote_code)
        self.device = current_device()
        self.torch_dtype = strategy.torch_dtype

        self.actor, self.actor_scheduler = self._init_actor()
        self.ref = self._init_frozen_actor_copy(offload=args.offload_reference_model)
        self.actor_ema = self._init_ema() if args.enable_ema else None
        self.critic, self.critic_scheduler = self._init_critic() if self.uses_critic else (None, None)
        self.reward = self._init_reward() if self.uses_reward_model else None

    # A micro-batch of the frozen engines is a whole generation batch (they only score it).
    def _frozen(self, model, zero_stage: int, offload: bool):
        return self.strategy.prepare_frozen(model, zero_stage=zero_stage, offload=offload,
                                            micro_batch=self.args.per_device_generation_batch_size)

    def _trained(self, model, *, lr, weight_decay, lora_lr, zero_stage):
        a = self.args
        return self.strategy.prepare_trained(model, TrainSpec(
            lr=lr, weight_decay=weight_decay, lora_lr=lora_lr, zero_stage=zero_stage, offload=a.offload,
            micro_batch=a.per_device_training_batch_size, grad_accum=a.gradient_accumulation_steps,
            grad_clip=a.max_grad_norm, scheduler=a.lr_scheduler_type, warmup_steps=a.num_warmup_steps,
            total_steps=self.num_total_iters))

    def _init_actor(self):
        a = self.args
        model = load_causal_lm(self.actor_path, self.tokenizer, dtype=self.torch_dtype,
                               dropout=a.actor_dropout, trust_remote_code=a.trust_remote_code,
                               gradient_checkpointing=a.actor_gradient_checkpointing)
        if a.actor_lora_dim > 0:
            model = apply_lora(model, a.actor_lora_dim, a.actor_lora_module_name, a.actor_lora_alpha,
                               only_optimize_lora=a.only_optimize_lora, role="actor")
        return self._trained(model, lr=a.actor_learning_rate, weight_decay=a.actor_weight_decay,
                             lora_lr=a.actor_lora_learning_rate, zero_stage=a.actor_zero_stage)

    def _init_frozen_actor_copy(self, offload: bool):
        """Reference or EMA: the starting actor weights, sharded like the actor under ZeRO-3."""
        model = load_causal_lm(self.actor_path, self.tokenizer, dtype=self.torch_dtype, dropout=0.0,
                               trust_remote_code=self.args.trust_remote_code)
        return self._frozen(model, self.args.actor_zero_stage, offload)

    def _init_ema(self):
        """The actor's starting weights as loaded, kept in fp32 (see utils/ema.py), partitioned
        and placed like the actor's parameters (ema_placement)."""
        model = load_causal_lm(self.actor_path, self.tokenizer, dtype=self.torch_dtype, dropout=0.0,
                               trust_remote_code=self.args.trust_remote_code).float()
        zero_stage, offload = ema_placement(self.args.actor_zero_stage, self.args.offload)
        return self.strategy.prepare_frozen(model, zero_stage=zero_stage, offload=offload, dtype="fp32",
                                            micro_batch=self.args.per_device_generation_batch_size)

    def _init_critic(self):
        a = self.args
        model = load_reward_model(self.critic_path, self.tokenizer, dtype=self.torch_dtype,
                                  dropout=a.critic_dropout, trust_remote_code=a.trust_remote_code,
                                  gradient_checkpointing=a.critic_gradient_checkpointing)
        if a.critic_lora_dim > 0:
            model.hf_model = apply_lora(model.hf_model, a.critic_lora_dim, a.critic_lora_module_name,
                                        a.critic_lora_alpha, only_optimize_lora=a.only_optimize_lora,
                                        role="critic")
            model.hf_model.score.weight.requires_grad_(True)  # the value head always trains
        return self._trained(model, lr=a.critic_learning_rate, weight_decay=a.critic_weight_decay,
                             lora_lr=a.critic_lora_learning_rate, zero_stage=a.critic_zero_stage)

    def _init_reward(self):
        model = load_reward_model(self.reward_path, self.tokenizer, dtype=self.torch_dtype, dropout=0.0,
                                  trust_remote_code=self.args.trust_remote_code)
        return self._frozen(model, self.args.critic_zero_stage, self.args.offload_reward_model)
