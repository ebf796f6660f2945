#!/usr/bin/env bash
# Step 3 on one GPU: OPT-1.3B actor (Step 1 output), OPT-350M critic/reward (Step 2 output),
# hybrid engine, prompt 256 + answer 256. Run from the repository root:
#   bash training/step3_rlhf_finetuning/training_scripts/single_gpu/run_1.3b.sh ACTOR CRITIC [output_dir]
ACTOR=${1:?actor path (Step 1 output)}; CRITIC=${2:?critic path (Step 2 output)}
OUTPUT=${3:-output/step3_opt1.3b}
deepspeed --num_gpus 1 --module training.step3_rlhf_finetuning.main \
   --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
   --data_path Dahoas/rm-static --data_split 2,4,4 \
   --per_device_generation_batch_size 16 --per_device_training_batch_size 16 --generation_batches 1 \
   --ppo_epochs 1 --max_prompt_seq_len 256 --max_answer_seq_len 256 \
   --actor_learning_rate 9.65e-6 --critic_learning_rate 5e-6 --num_warmup_steps 100 \
   --actor_zero_stage 0 --critic_zero_stage 0 --dtype bf16 \
   --actor_gradient_checkpointing --critic_gradient_checkpointing \
   --enable_ema --enable_tensorboard --output_dir "$OUTPUT"
