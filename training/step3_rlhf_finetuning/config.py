"""Step 3's configuration: typed parts composed into one `Step3Config`.

    cfg.actor, cfg.critic  EngineConfig: each trained model's ZeRO stage, optimizer, LoRA,
                           dropout, activation checkpointing
    cfg.ppo                PPOConfig: KL, clips, discount, advantages, loss, EMA
    cfg.generation         GenerationConfig: prompt/answer lengths and sampling
    cfg.hybrid             HybridConfig: the hybrid engine that generates
    cfg.ptx                PtxConfig: the optional language-model (ptx) loss
    the rest               flat, as in every step: data, models, batches/schedule, runtime,
                           checkpoints, logging

The command line stays DeepSpeed-Chat's flat flags. The alias table from a flat flag to its
field is `flag_table(Step3Config)` (utils/config.py): a group's fields are flags named with its
prefix (`actor_` + `zero_stage` -> `--actor_zero_stage` sets `cfg.actor.zero_stage`; the ppo,
generation, hybrid and ptx groups have none: `--kl_ctl` sets `cfg.ppo.kl_ctl`). `as_step3_config`
turns a flat namespace (DeepSpeed-Chat's scripts build one) into a Step3Config through it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from utils.config import (DTYPES, SCHEDULES, CheckpointConfig, ConfigError, DataConfig, LogConfig, RuntimeConfig,
                          doc, flag_table, from_flat, group, to_flat, validate_run)
from utils.rewards import load_reward_functions, weights_for
from utils.upstream_flags import STEP3, flags_for

@dataclass
class EngineConfig:
    """One trained model of Step 3 (actor or critic): flags `--actor_<field>`, `--critic_<field>`."""
    dropout: float | None = field(default=0.0, metadata=doc("Dropout probability."))
    gradient_checkpointing: bool = field(default=False, metadata=doc("Recompute activations."))
    zero_stage: int = field(default=0, metadata=doc("ZeRO stage.", choices=(0, 1, 2, 3)))
    lora_dim: int = field(default=0, metadata=doc("LoRA rank (0 = off)."))
    lora_alpha: float = field(default=0.0, metadata=doc("LoRA alpha."))
    lora_module_name: str = field(default="", metadata=doc("Only LoRA-wrap layers whose name contains this."))
    lora_learning_rate: float = field(default=5e-4, metadata=doc("LoRA learning rate."))
    learning_rate: float = field(default=1e-5, metadata=doc("Peak learning rate."))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay."))


ACTOR_HELP = {
    "dropout": "Actor dropout probability (default 0: dropout makes the PPO ratio noisy; None keeps the model's).",
    "gradient_checkpointing": "Recompute actor activations.",
    "zero_stage": "ZeRO stage of the actor (and of the reference and EMA copies when 3).",
    "lora_dim": "Actor LoRA rank (0 = off).",
    "lora_alpha": "Actor LoRA alpha: the update is scaled by alpha / rank (0 = the rank, scale 1; "
                  "DeepSpeed-Chat's 1 / rank is 1).",
    "lora_module_name": "Only LoRA-wrap actor layers whose name contains this (default: all projections).",
    "lora_learning_rate": "Actor LoRA learning rate.",
    "learning_rate": "Actor peak learning rate.",
    "weight_decay": "Actor AdamW weight decay.",
}
CRITIC_HELP = {
    "dropout": "Critic dropout probability.",
    "gradient_checkpointing": "Recompute critic activations.",
    "zero_stage": "ZeRO stage of the critic (and of the reward model when 3).",
    "lora_dim": "Critic LoRA rank (0 = off).",
    "lora_alpha": "Critic LoRA alpha, as --actor_lora_alpha.",
    "lora_module_name": "As --actor_lora_module_name.",
    "lora_learning_rate": "Critic LoRA learning rate.",
    "learning_rate": "Critic peak learning rate.",
    "weight_decay": "Critic AdamW weight decay.",
}


@dataclass
class ModelsConfig:
    actor_model_name_or_path: str = field(default="tiny-llama", metadata=doc(
        "The Step 1 model (trained) — also the reference and the EMA starting point."))
    critic_model_name_or_path: str = field(default="tiny-llama", metadata=doc(
        "The Step 2 reward model: starts the critic and, unless --reward_model_name_or_path is "
        "given, is the reward model (with --reward_source checker or --reward_fn alone: only the critic's start)."))
    reward_model_name_or_path: str = field(default="", metadata=doc(
        "A reward model other than the critic's starting point (default: the critic's path)."))
    num_padding_at_beginning: int = field(default=1, metadata=doc(
        "Accepted for DeepSpeed-Chat scripts and ignored: rewards are read at the last real token."))
    dtype: str = field(default="auto", metadata=doc(
        "bf16, fp32, fp16 (CUDA only), or auto (bf16 where the hardware runs it natively, else "
        "fp16 on GPU / fp32 on CPU).", choices=DTYPES))
    trust_remote_code: bool = field(default=False, metadata=doc("Allow hub model code to run."))
    offload_reference_model: bool = field(default=False, metadata=doc(
        "Keep the reference model's parameters in CPU memory (ZeRO-3 parameter offload). With "
        "--actor_lora_dim > 0 and --only_optimize_lora no reference is loaded (it is the actor with its "
        "adapters off, placed as the actor): accepted, as DeepSpeed-Chat's scripts pass it, and without effect."))
    offload_reward_model: bool = field(default=False, metadata=doc(
        "Keep the reward model's parameters in CPU memory (ZeRO-3 parameter offload)."))
    only_optimize_lora: bool = field(default=False, metadata=doc(
        "Train only the LoRA matrices (and the critic's value head). With --actor_lora_dim > 0 the "
        "reference is then the actor with its adapters off (no second copy of the model) and --enable_ema "
        "averages the adapters alone."))
    reward_source: str = field(default="auto", metadata=doc(
        "What scores the answers besides any --reward_fn: model (the reward model), checker (a bundled "
        "task family's ground-truth checker, score in [0, 1]; needs --data_path bundled or "
        "bundled-constraints; no reward model is loaded and the critic starts from --critic_model_name_or_path, e.g. the Step 1 model; a "
        "verifiable reward, and the upper bound a learned reward model can reach on this task), or auto: "
        "the reward model, but with --reward_fn only when --reward_model_name_or_path is given.",
        choices=("auto", "model", "checker")))
    reward_fn: list[str] = field(default_factory=list, metadata=doc(
        "Reward functions, FILE.py:NAME or package.module:NAME, called fn(prompts=[...], "
        "completions=[...], **row columns) -> one float or None per answer (docs/reference.md: Your "
        "own reward). Repeatable; their weighted sum is the reward, with the reward model's or checker's "
        "score when --reward_source says so.", repeat=True))
    reward_weights: list[float] = field(default_factory=list, metadata=doc(
        "One weight per --reward_fn in order, then one for the reward model or checker when used "
        "(default all 1)."))


@dataclass
class BatchConfig:
    per_device_generation_batch_size: int = field(default=16, metadata=doc("Prompts per process per rollout."))
    per_device_training_batch_size: int = field(default=16, metadata=doc("PPO micro-batch per process."))
    generation_batches: int = field(default=1, metadata=doc("Rollouts collected before each PPO update."))
    ppo_epochs: int = field(default=1, metadata=doc("Passes of PPO updates over each collected experience."))
    num_train_epochs: int = field(default=1, metadata=doc("Passes over the prompt data."))
    max_rounds: int = field(default=0, metadata=doc(
        "Stop after this many rollout rounds (0 = all the prompt data); the learning-rate "
        "schedules span the rounds actually run."))
    gradient_accumulation_steps: int = field(default=1, metadata=doc("Micro-batches per optimizer step."))
    lr_scheduler_type: str = field(default="cosine", metadata=doc("Schedule after warmup.", choices=SCHEDULES))
    num_warmup_steps: int = field(default=100, metadata=doc("Linear warmup steps of both schedules."))
    max_grad_norm: float = field(default=1.0, metadata=doc("Gradient clipping norm (0 = off)."))


@dataclass
class GenerationConfig:
    max_prompt_seq_len: int = field(default=256, metadata=doc(
        "Longer prompts are cut from the left (the question's end is kept); the count is reported once."))
    max_answer_seq_len: int = field(default=256, metadata=doc("Generated tokens per answer (at most)."))
    temperature: float = field(default=1.0, metadata=doc(
        "Sampling temperature of rollouts; the log-probs of actor and reference are taken at the "
        "same temperature, so PPO's ratio and the KL refer to the sampled distribution."))
    top_k: int = field(default=0, metadata=doc("Top-k sampling of rollouts (0 = off)."))
    top_p: float = field(default=1.0, metadata=doc("Nucleus sampling of rollouts (1 = off)."))
    ignore_eos: bool = field(default=False, metadata=doc(
        "Generate exactly --max_answer_seq_len tokens per answer, eos included as an ordinary token "
        "(benchmarks: fixed work per rollout, as compared with other toolkits)."))
    samples_per_prompt: int = field(default=1, metadata=doc(
        "Answers sampled per prompt in each rollout (rloo and grpo need at least 2)."))


@dataclass
class PPOConfig:
    kl_ctl: float = field(default=0.1, metadata=doc(
        "Per-token KL penalty coefficient (the starting one with --target_kl)."))
    target_kl: float = field(default=0.0, metadata=doc(
        "KL to the reference per answer (summed over its tokens) to steer toward: after each round "
        "the coefficient grows when the rollouts' KL is above it and shrinks when below (Ziegler et "
        "al. 2019's adaptive controller). 0 keeps --kl_ctl fixed, as DeepSpeed-Chat does."))
    kl_horizon: int = field(default=10000, metadata=doc(
        "With --target_kl: answers over which the controller may change the coefficient by up to "
        "e^0.2 (a round of n answers moves it by at most a factor 1 + 0.2 n / kl_horizon). Short "
        "runs need a short horizon."))
    clip_reward_value: float = field(default=5.0, metadata=doc("Reward model scores are clipped to +-this."))
    cliprange: float = field(default=0.2, metadata=doc("PPO policy ratio clip."))
    cliprange_value: float = field(default=0.2, metadata=doc("Value clip around the rollout's values."))
    gamma: float = field(default=1.0, metadata=doc("Discount."))
    lam: float = field(default=0.95, metadata=doc("GAE lambda."))
    advantage: str = field(default="gae", metadata=doc(
        "How answers are credited: gae (PPO's critic and GAE, as DeepSpeed-Chat), or critic-free over "
        "--samples_per_prompt answers to each prompt: rloo (each answer's reward minus the mean of the "
        "others'), grpo (score minus the group mean, over the group's std: see --scale_rewards, "
        "--kl_penalty). Critic-free, "
        "no critic is loaded, trained or saved (--critic_model_name_or_path then only names the "
        "reward model, and is not needed with --reward_source checker).",
        choices=("gae", "rloo", "grpo")))
    kl_penalty: str = field(default="auto", metadata=doc(
        "Where the KL to the reference enters: reward (-kl_ctl x log-ratio on every answer token, "
        "InstructGPT/DeepSpeed-Chat; with rloo the group baseline covers it), loss (kl_ctl x a k3 KL "
        "term in the actor's loss, GRPO as published: the advantages come from the scores alone), or "
        "auto (loss for grpo, reward otherwise).", choices=("auto", "reward", "loss")))
    scale_rewards: str = field(default="group", metadata=doc(
        "grpo: divide each answer's score minus its group's mean by the std of the group's scores "
        "(group, GRPO), of the whole rollout's (batch), or not at all (none, Dr. GRPO). A group whose "
        "scores tie gets advantage 0 in every case.", choices=("group", "batch", "none")))
    loss_aggregation: str = field(default="token", metadata=doc(
        "How the actor's per-token loss is averaged: token (over the micro-batch's answer tokens, "
        "DeepSpeed-Chat), sequence (per answer, then over answers: GRPO), dr_grpo (sum / (answers x "
        "--max_answer_seq_len): no length bias, Dr. GRPO), dapo (over all answer tokens of the "
        "optimizer step, every micro-batch and process: DAPO).",
        choices=("token", "sequence", "dr_grpo", "dapo")))
    cliprange_high: float = field(default=0.0, metadata=doc(
        "Upper policy ratio clip, 1 + this (DAPO's clip-higher, e.g. 0.28); 0 = --cliprange."))
    whiten_advantages: bool = field(default=False, metadata=doc(
        "Normalize each rollout's advantages to zero mean and unit variance (as TRL does); "
        "off by default, as in DeepSpeed-Chat."))
    recompute_rollout_logprobs: bool = field(default=None, metadata=doc(
        "Score the rollout's own log-probs (PPO's old policy) with a second actor forward after "
        "generating, as DeepSpeed-Chat does; --no-recompute_rollout_logprobs keeps them from the "
        "generation pass itself (the same tempered softmax, one actor forward fewer per answer). "
        "Default: kept when the actor computes in fp32 (they agree with a training forward to ~1e-5), "
        "recomputed in bf16 (there they drift by ~0.05 per token: docs/2026-12-05-rollout-logprobs.md) "
        "or with --rollout_is_cap."))
    rollout_is_cap: float = field(default=0.0, metadata=doc(
        "Truncated importance sampling (TIS, as TRL's and OpenRLHF's): weigh each token's policy "
        "loss by min(p_recomputed / p_generation, this), correcting for the generation pass "
        "computing slightly different probabilities (bf16, KV cache, fused LoRA) than training "
        "does. Recomputes the rollout log-probs. 0 = off."))
    pack_sequences: bool = field(default=True, metadata=doc(
        "Actor, reference and critic forwards read the rollout's real tokens, its rows packed into bins 1-2x "
        "the longest row wide: most padding (4 of 10 positions in a real run) costs nothing. A model whose "
        "packed outputs differ from padded ones on its first batch (BLOOM, OPT) keeps padded forwards, as "
        "does the reward model; --no-pack_sequences pads all, as DeepSpeed-Chat does."))
    reuse_critic_forward: bool = field(default=True, metadata=doc(
        "With one PPO micro-batch a round (one generation batch, one epoch, one micro-batch) and no "
        "critic dropout, the rollout's values come from the critic's training forward, which runs at "
        "the same weights: one critic forward fewer per answer. --no-reuse_critic_forward scores the "
        "values in a forward of their own, as DeepSpeed-Chat does."))
    enable_ema: bool = field(default=False, metadata=doc("Keep an exponential moving average of the actor."))
    ema_decay: float = field(default=0.992, metadata=doc(
        "EMA decay per actor optimizer step (the average is kept in fp32 whatever --dtype; saved in --dtype)."))

    @property
    def uses_critic(self) -> bool:
        """gae needs a critic; the critic-free advantages (rloo, grpo) load none."""
        return self.advantage == "gae"

    @property
    def kl_in_loss(self) -> bool:
        """Where the KL to the reference enters: shaped into the per-token reward (InstructGPT,
        DeepSpeed-Chat, RLOO) or a k3 term in the actor's loss (GRPO); auto: loss for grpo."""
        mode = self.kl_penalty if self.kl_penalty != "auto" else "loss" if self.advantage == "grpo" else "reward"
        return mode == "loss"


@dataclass
class PtxConfig:
    unsupervised_dataset_name: str = field(default="", metadata=doc(
        "Plain-text source for the ptx loss ('bundled' or 'bundled-constraints': the task family's prose; a "
        "text/jsonl file; or a hub set); empty = off."))
    unsupervised_dataset_config_name: str = field(default="", metadata=doc("Hub config of that source."))
    unsup_coef: float = field(default=27.8, metadata=doc("Weight of the ptx loss."))
    compute_fp32_loss: bool = field(default=False, metadata=doc("ptx loss from fp32 logits."))

    @property
    def enabled(self) -> bool:
        return bool(self.unsupervised_dataset_name)


@dataclass
class HybridConfig:
    enable_hybrid_engine: bool = field(default=True, metadata=doc(
        "Generate through our hybrid engine (gathered, LoRA-fused, optionally tensor-parallel "
        "inference copy with a KV cache); --no-enable_hybrid_engine uses plain HF generate on the engine."))
    inference_tp_size: int = field(default=1, metadata=doc("Tensor-parallel size of generation."))
    tp_gather_partition_size: int = field(default=8, metadata=doc(
        "Layers gathered at a time when refreshing the inference copy under ZeRO-3."))
    release_inference_cache: bool = field(default=False, metadata=doc(
        "Free the inference copy after each rollout (less memory, rebuilt each time)."))
    unpin_actor_parameters: bool = field(default=False, metadata=doc("Accepted for DeepSpeed-Chat scripts; no effect."))


@dataclass
class Step3Config(CheckpointConfig, LogConfig, RuntimeConfig, BatchConfig, ModelsConfig, DataConfig):
    upstream_step = STEP3  # its DeepSpeed-Chat flags (utils/upstream_flags.py); not a flag
    actor: EngineConfig = group(EngineConfig, "actor_", ACTOR_HELP, learning_rate=9.65e-6)
    critic: EngineConfig = group(EngineConfig, "critic_", CRITIC_HELP, learning_rate=5e-6)
    generation: GenerationConfig = group(GenerationConfig)
    ppo: PPOConfig = group(PPOConfig)
    ptx: PtxConfig = group(PtxConfig)
    hybrid: HybridConfig = group(HybridConfig)
    print_answers: bool = field(default=False, metadata=doc("Print a prompt and its answer now and then."))
    print_answers_interval: int = field(default=1, metadata=doc("Iterations between printed answers."))
    enable_test_mode: bool = field(default=False, metadata=doc(
        "Stop after --test_stop_step iterations (DeepSpeed-Chat's name; --max_rounds does the same)."))
    test_stop_step: int = field(default=3, metadata=doc("Iterations run in test mode."))

    @property
    def answers_per_rank(self) -> int:
        """Answers each process samples per round."""
        return self.per_device_generation_batch_size * self.generation_batches * self.generation.samples_per_prompt

    @property
    def micro_batches_per_round(self) -> int:
        """PPO micro-batches per round (each also consumes one ptx batch when ptx is on)."""
        return self.answers_per_rank // self.per_device_training_batch_size * self.ppo_epochs

    @property
    def values_from_update(self) -> bool:
        """The critic's first training forward of a round can give the rollout's values: it is the
        round's only one, so it runs at the scoring weights, and it has no dropout. (Not with
        --rollout_is_cap, whose weights are computed with the rest of the credit at scoring.)"""
        return (self.ppo.reuse_critic_forward and self.ppo.uses_critic and self.generation_batches == 1
                and self.micro_batches_per_round == 1 and self.critic.dropout == 0 and not self.ppo.rollout_is_cap)

    def validate(self) -> None:
        g = self.generation
        validate_run(self, "output/step3_rlhf", {
            "--per_device_generation_batch_size": self.per_device_generation_batch_size,
            "--per_device_training_batch_size": self.per_device_training_batch_size,
            "--generation_batches": self.generation_batches, "--ppo_epochs": self.ppo_epochs,
            "--max_prompt_seq_len": g.max_prompt_seq_len, "--max_answer_seq_len": g.max_answer_seq_len,
            "--gradient_accumulation_steps": self.gradient_accumulation_steps,
            "--inference_tp_size": self.hybrid.inference_tp_size, "--num_train_epochs": self.num_train_epochs,
            "--samples_per_prompt": g.samples_per_prompt})
        if self.max_rounds < 0:
            raise ConfigError(f"--max_rounds must be >= 0, got {self.max_rounds}")
        if self.answers_per_rank % self.per_device_training_batch_size:
            raise ConfigError(
                f"--per_device_generation_batch_size x --generation_batches x --samples_per_prompt = "
                f"{self.answers_per_rank} answers per update must divide into --per_device_training_batch_size "
                f"{self.per_device_training_batch_size} micro-batches")
        if self.only_optimize_lora and self.actor.lora_dim <= 0 and self.critic.lora_dim <= 0:
            raise ConfigError("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")
        self._validate_reward_source()
        validate_ppo(self.ppo, self.generation.samples_per_prompt)
        self.max_seq_len = self.generation.max_prompt_seq_len + self.generation.max_answer_seq_len  # ptx blocks

    @property
    def uses_reward_model(self) -> bool:
        """Whether a reward model is loaded and scores the answers (reward_model_used)."""
        return reward_model_used(self.reward_source, bool(self.reward_fn), self.reward_model_name_or_path)

    def _validate_reward_source(self) -> None:
        if self.reward_source == "checker":
            from utils.data.tasks import FAMILIES, family_of  # loads the data layer: only when asked
            if family_of(self.data_path) is None:
                raise ConfigError("--reward_source checker scores a bundled task family's answers: it needs "
                                  f"--data_path {' or '.join(FAMILIES)}, got {' '.join(self.data_path)}")
        if self.reward_source == "checker" and self.reward_model_name_or_path:
            raise ConfigError("--reward_model_name_or_path has no use with --reward_source checker")
        # imported here (a bad spec fails now, before any model loads), and the weights counted
        functions = load_reward_functions(self.reward_fn)
        weights_for(reward_names([f.name for f in functions], self.reward_source, self.uses_reward_model),
                    self.reward_weights)


def reward_model_used(reward_source: str, has_functions: bool, reward_model_path: str) -> bool:
    """The reward model scores the answers with --reward_source model, and with auto unless reward
    functions are given without --reward_model_name_or_path (then they are the whole reward)."""
    if reward_source == "auto":
        return not has_functions or bool(reward_model_path)
    return reward_source == "model"


def reward_names(function_names: list[str], reward_source: str, model_used: bool) -> list[str]:
    """The rewards in --reward_weights order: the functions, then the reward model ("model") or
    the checker ("checker") when used (renamed if a function already has that name)."""
    base = "checker" if reward_source == "checker" else "model" if model_used else None
    if base is None:
        return list(function_names)
    name = base
    while name in function_names:
        name += "_"
    return [*function_names, name]


def validate_ppo(ppo: PPOConfig, samples_per_prompt: int) -> None:
    if ppo.advantage != "gae" and samples_per_prompt < 2:
        raise ConfigError(f"--advantage {ppo.advantage} compares answers to the same prompt: "
                          f"it needs --samples_per_prompt 2 or more")
    if ppo.target_kl < 0 or ppo.kl_horizon < 1:
        raise ConfigError(f"--target_kl must be >= 0 and --kl_horizon >= 1, got {ppo.target_kl} "
                          f"and {ppo.kl_horizon}")
    if ppo.scale_rewards != "group" and ppo.advantage != "grpo":
        raise ConfigError(f"--scale_rewards {ppo.scale_rewards} scales grpo's advantages; "
                          f"--advantage {ppo.advantage} has none to scale")
    if ppo.cliprange_high < 0:
        raise ConfigError(f"--cliprange_high must be >= 0, got {ppo.cliprange_high}")
    if not 0 < ppo.ema_decay < 1:
        raise ConfigError(f"--ema_decay must be in (0, 1), got {ppo.ema_decay}")
    if ppo.rollout_is_cap < 0:
        raise ConfigError(f"--rollout_is_cap must be >= 0 (0: off), got {ppo.rollout_is_cap}")
    if ppo.rollout_is_cap and ppo.recompute_rollout_logprobs is False:
        raise ConfigError("--rollout_is_cap weighs recomputed log-probs against the generation's: "
                          "it cannot go with --no-recompute_rollout_logprobs")


def as_step3_config(args) -> Step3Config:
    """A Step3Config from what a caller passes as `args`: one already (returned as is), or a
    flat namespace as DeepSpeed-Chat's scripts build (`actor_zero_stage`, `actor_learning_rate`,
    ...; its older names too: utils/upstream_flags.py). Flags it lacks take their defaults;
    names that are no flag here are left out. Not validated: the caller built its own."""
    if isinstance(args, Step3Config):
        return args
    given = dict(vars(args))
    values = to_flat(Step3Config())
    for flag in flags_for(STEP3, set(values)):
        name = flag.name[2:]
        if not flag.to or name not in given:
            continue
        if flag.value is None and given[name]:  # a switch on: --disable_actor_dropout sets actor_dropout 0
            given[flag.to] = flag.const
        elif flag.value is not None and flag.to not in given:  # an older name of a flag it lacks
            given[flag.to] = given[name]
    values.update({name: value for name, value in given.items() if name in values})
    return from_flat(Step3Config, values)


def config_record(cfg: Step3Config) -> dict:
    """What training_config.json holds: the config as a nested dict (its groups as sub-dicts)."""
    return dataclasses.asdict(cfg)


STEP3_FLAGS = flag_table(Step3Config)  # the alias table: flat flag name -> field path
