#!/usr/bin/env bash
# Step 3 on this CPU: SmolLM2-135M actor (Step 1 output) and reward model (Step 2 output) on the
# bundled task, two CPU processes, actor ZeRO-2.
ACTOR=${1:-output/step1_sft}; CRITIC=${2:-output/step2_reward}; OUTPUT=${3:-output/step3_rlhf}
deepspeed --num_gpus 2 --module training.step3_rlhf_finetuning.main \
   --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
   --data_path bundled --num_examples 3000 --max_prompt_seq_len 64 --max_answer_seq_len 32 \
   --per_device_generation_batch_size 8 --per_device_training_batch_size 8 \
   --actor_learning_rate 5e-6 --critic_learning_rate 1e-5 --num_warmup_steps 5 \
   --actor_zero_stage 2 --critic_zero_stage 2 --enable_ema --dtype auto --output_dir "$OUTPUT"
