#!/usr/bin/env bash
# Step 2 on this CPU: SmolLM2-135M reward model from the Step 1 output, bundled pairs.
MODEL=${1:-output/step1_sft}; OUTPUT=${2:-output/step2_reward}
python -m training.step2_reward_model_finetuning.main --model_name_or_path "$MODEL" \
   --data_path bundled --num_examples 2000 --max_seq_len 128 --per_device_train_batch_size 8 \
   --learning_rate 3e-5 --num_warmup_steps 5 --zero_stage 0 --dtype auto --output_dir "$OUTPUT"
