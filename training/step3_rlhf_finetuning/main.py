"""Step 3: RLHF with PPO — actor, reference, critic, reward model (+ EMA, + ptx).

Run from the repository root:
    python -m training.step3_rlhf_finetuning.main --actor_model_name_or_path output/step1_sft \\
        --critic_model_name_or_path output/step2_reward
    deepspeed --num_gpus 2 --module training.step3_rlhf_finetuning.main --actor_zero_stage 3 ...

Outputs <output_dir>/actor (and actor_ema with --enable_ema), <output_dir>/critic (with --advantage gae):
Hugging Face folders; chat.py loads the actors.
"""
from __future__ import annotations

if not __package__:  # started as a file path: the absolute imports below need the repo root
    raise SystemExit("error: run Step 3 from the repository root as "
                     "`python -m training.step3_rlhf_finetuning.main`")

from dataclasses import dataclass, field

from utils.config import (CheckpointConfig, ConfigError, DataConfig, LogConfig, RuntimeConfig, doc, parse_config,
                          validate_run)


@dataclass
class ModelsConfig:
    actor_model_name_or_path: str = field(default="tiny-llama", metadata=doc(
        "The Step 1 model (trained) — also the reference and the EMA starting point."))
    critic_model_name_or_path: str = field(default="tiny-llama", metadata=doc(
        "The Step 2 reward model: starts the critic and, unless --reward_model_name_or_path is "
        "given, is the reward model."))
    reward_model_name_or_path: str = field(default="", metadata=doc(
        "A reward model other than the critic's starting point (default: the critic's path)."))
    num_padding_at_beginning: int = field(default=1, metadata=doc(
        "Accepted for DeepSpeed-Chat scripts and ignored: rewards are read at the last real token."))
    dtype: str = field(default="auto", metadata=doc(
        "bf16, fp32, fp16 (CUDA only), or auto (bf16 where the hardware runs it natively, else "
        "fp16 on GPU / fp32 on CPU).", choices=("auto", "bf16", "fp32", "fp16")))
    trust_remote_code: bool = field(default=False, metadata=doc("Allow hub model code to run."))
    actor_dropout: float | None = field(default=0.0, metadata=doc(
        "Actor dropout probability (default 0: dropout makes the PPO ratio noisy; None keeps the model's)."))
    critic_dropout: float | None = field(default=0.0, metadata=doc("Critic dropout probability."))
    actor_gradient_checkpointing: bool = field(default=False, metadata=doc("Recompute actor activations."))
    critic_gradient_checkpointing: bool = field(default=False, metadata=doc("Recompute critic activations."))
    actor_zero_stage: int = field(default=0, metadata=doc(
        "ZeRO stage of the actor (and of the reference and EMA copies when 3).", choices=(0, 1, 2, 3)))
    critic_zero_stage: int = field(default=0, metadata=doc(
        "ZeRO stage of the critic (and of the reward model when 3).", choices=(0, 1, 2, 3)))
    offload_reference_model: bool = field(default=False, metadata=doc(
        "Keep the reference model's parameters in CPU memory (ZeRO-3 parameter offload)."))
    offload_reward_model: bool = field(default=False, metadata=doc(
        "Keep the reward model's parameters in CPU memory (ZeRO-3 parameter offload)."))
    actor_lora_dim: int = field(default=0, metadata=doc("Actor LoRA rank (0 = off)."))
    actor_lora_alpha: float = field(default=0.0, metadata=doc(
        "Actor LoRA alpha: the update is scaled by alpha / rank (0 = the rank, scale 1; "
        "DeepSpeed-Chat's 1 / rank is 1)."))
    actor_lora_module_name: str = field(default="", metadata=doc(
        "Only LoRA-wrap actor layers whose name contains this (default: all projections)."))
    critic_lora_dim: int = field(default=0, metadata=doc("Critic LoRA rank (0 = off)."))
    critic_lora_alpha: float = field(default=0.0, metadata=doc("Critic LoRA alpha, as --actor_lora_alpha."))
    critic_lora_module_name: str = field(default="", metadata=doc("As --actor_lora_module_name."))
    only_optimize_lora: bool = field(default=False, metadata=doc(
        "Train only the LoRA matrices (and the critic's value head)."))
    actor_lora_learning_rate: float = field(default=5e-4, metadata=doc("Actor LoRA learning rate."))
    critic_lora_learning_rate: float = field(default=5e-4, metadata=doc("Critic LoRA learning rate."))


@dataclass
class PPOLoopConfig:
    per_device_generation_batch_size: int = field(default=16, metadata=doc("Prompts per process per rollout."))
    per_device_training_batch_size: int = field(default=16, metadata=doc("PPO micro-batch per process."))
    generation_batches: int = field(default=1, metadata=doc("Rollouts collected before each PPO update."))
    ppo_epochs: int = field(default=1, metadata=doc("Passes of PPO updates over each collected experience."))
    max_prompt_seq_len: int = field(default=256, metadata=doc(
        "Longer prompts are cut from the left (the question's end is kept); the count is reported once."))
    max_answer_seq_len: int = field(default=256, metadata=doc("Generated tokens per answer (at most)."))
    num_train_epochs: int = field(default=1, metadata=doc("Passes over the prompt data."))
    max_rounds: int = field(default=0, metadata=doc(
        "Stop after this many rollout rounds (0 = all the prompt data); the learning-rate "
        "schedules span the rounds actually run."))
    gradient_accumulation_steps: int = field(default=1, metadata=doc("Micro-batches per optimizer step."))
    actor_learning_rate: float = field(default=9.65e-6, metadata=doc("Actor peak learning rate."))
    critic_learning_rate: float = field(default=5e-6, metadata=doc("Critic peak learning rate."))
    actor_weight_decay: float = field(default=0.0, metadata=doc("Actor AdamW weight decay."))
    critic_weight_decay: float = field(default=0.0, metadata=doc("Critic AdamW weight decay."))
    lr_scheduler_type: str = field(default="cosine", metadata=doc(
        "Schedule after warmup.", choices=("linear", "cosine", "cosine_with_restarts", "polynomial",
                                           "constant", "constant_with_warmup")))
    num_warmup_steps: int = field(default=100, metadata=doc("Linear warmup steps of both schedules."))
    max_grad_norm: float = field(default=1.0, metadata=doc("Gradient clipping norm (0 = off)."))
    compute_fp32_loss: bool = field(default=False, metadata=doc("ptx loss from fp32 logits."))


@dataclass
class PPOAlgoConfig:
    reward_source: str = field(default="model", metadata=doc(
        "What scores the answers: the reward model, or 'checker', the bundled task's ground-truth "
        "checker (score in [0, 1]; needs --data_path bundled; no reward model is loaded and the critic "
        "starts from --critic_model_name_or_path, e.g. the Step 1 model). A verifiable reward, and "
        "the upper bound a learned reward model can reach on this task.", choices=("model", "checker")))
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
    samples_per_prompt: int = field(default=1, metadata=doc(
        "Answers sampled per prompt in each rollout (rloo and grpo need at least 2)."))
    whiten_advantages: bool = field(default=False, metadata=doc(
        "Normalize each rollout's advantages to zero mean and unit variance (as TRL does); "
        "off by default, as in DeepSpeed-Chat."))
    temperature: float = field(default=1.0, metadata=doc(
        "Sampling temperature of rollouts; the log-probs of actor and reference are taken at the "
        "same temperature, so PPO's ratio and the KL refer to the sampled distribution."))
    top_k: int = field(default=0, metadata=doc("Top-k sampling of rollouts (0 = off)."))
    top_p: float = field(default=1.0, metadata=doc("Nucleus sampling of rollouts (1 = off)."))
    ignore_eos: bool = field(default=False, metadata=doc(
        "Generate exactly --max_answer_seq_len tokens per answer, eos included as an ordinary token "
        "(benchmarks: fixed work per rollout, as compared with other toolkits)."))
    enable_ema: bool = field(default=False, metadata=doc("Keep an exponential moving average of the actor."))
    ema_decay: float = field(default=0.992, metadata=doc(
        "EMA decay per actor optimizer step (the average is kept in fp32 whatever --dtype; saved in --dtype)."))
    unsupervised_dataset_name: str = field(default="", metadata=doc(
        "Plain-text source for the ptx loss ('bundled', a text/jsonl file, or a hub set); empty = off."))
    unsupervised_dataset_config_name: str = field(default="", metadata=doc("Hub config of that source."))
    unsup_coef: float = field(default=27.8, metadata=doc("Weight of the ptx loss."))


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
class Step3Config(CheckpointConfig, LogConfig, RuntimeConfig, HybridConfig, PPOAlgoConfig, PPOLoopConfig, ModelsConfig, DataConfig):
    upstream_step = "step3"  # its DeepSpeed-Chat flags (utils/upstream_flags.py); not a flag
    print_answers: bool = field(default=False, metadata=doc("Print a prompt and its answer now and then."))
    print_answers_interval: int = field(default=1, metadata=doc("Iterations between printed answers."))
    enable_test_mode: bool = field(default=False, metadata=doc(
        "Stop after --test_stop_step iterations (DeepSpeed-Chat's name; --max_rounds does the same)."))
    test_stop_step: int = field(default=3, metadata=doc("Iterations run in test mode."))

    def validate(self) -> None:
        validate_run(self, "output/step3_rlhf", (
            "per_device_generation_batch_size", "per_device_training_batch_size", "generation_batches",
            "ppo_epochs", "max_prompt_seq_len", "max_answer_seq_len", "gradient_accumulation_steps",
            "inference_tp_size", "num_train_epochs", "samples_per_prompt"))
        if self.max_rounds < 0:
            raise ConfigError(f"--max_rounds must be >= 0, got {self.max_rounds}")
        rollout = self.per_device_generation_batch_size * self.generation_batches * self.samples_per_prompt
        if rollout % self.per_device_training_batch_size:
            raise ConfigError(
                f"--per_device_generation_batch_size x --generation_batches x --samples_per_prompt = {rollout} "
                f"answers per update must divide into --per_device_training_batch_size "
                f"{self.per_device_training_batch_size} micro-batches")
        if self.advantage != "gae" and self.samples_per_prompt < 2:
            raise ConfigError(f"--advantage {self.advantage} compares answers to the same prompt: "
                              f"it needs --samples_per_prompt 2 or more")
        if self.only_optimize_lora and self.actor_lora_dim <= 0 and self.critic_lora_dim <= 0:
            raise ConfigError("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")
        if self.reward_source == "checker" and any(path != "bundled" for path in self.data_path):
            raise ConfigError("--reward_source checker scores the bundled task's answers: it needs "
                              f"--data_path bundled, got {' '.join(self.data_path)}")
        if self.reward_source == "checker" and self.reward_model_name_or_path:
            raise ConfigError("--reward_model_name_or_path has no use with --reward_source checker")
        if self.target_kl < 0 or self.kl_horizon < 1:
            raise ConfigError(f"--target_kl must be >= 0 and --kl_horizon >= 1, got {self.target_kl} "
                              f"and {self.kl_horizon}")
        if self.scale_rewards != "group" and self.advantage != "grpo":
            raise ConfigError(f"--scale_rewards {self.scale_rewards} scales grpo's advantages; "
                              f"--advantage {self.advantage} has none to scale")
        if self.cliprange_high < 0:
            raise ConfigError(f"--cliprange_high must be >= 0, got {self.cliprange_high}")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        self.max_seq_len = self.max_prompt_seq_len + self.max_answer_seq_len  # ptx block length


def main(argv=None) -> None:
    cfg = parse_config(Step3Config, argv, description=__doc__.splitlines()[0])
    from training.step3_rlhf_finetuning.loop import run
    run(cfg)


if __name__ == "__main__":
    from utils.cli import run_entry
    run_entry(main)
