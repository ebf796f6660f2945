#!/usr/bin/env bash
# Step 2 smoke run on a CPU: a tiny random Llama reward model on the bundled pairs, under a minute.
OUTPUT=${1:-output/step2_tiny_cpu}
NPROC=${2:-1}
deepspeed --num_gpus "$NPROC" --module training.step2_reward_model_finetuning.main \
   --model_name_or_path tiny-llama --data_path bundled --num_examples 600 --max_seq_len 96 \
   --per_device_train_batch_size 8 --learning_rate 1e-3 --max_steps 10 --dtype fp32 \
   --zero_stage 2 --output_dir "$OUTPUT"
