#!/usr/bin/env bash
# Step 1 smoke run on a CPU: a tiny random Llama on the bundled task, under a minute.
OUTPUT=${1:-output/step1_tiny_cpu}
NPROC=${2:-1}
deepspeed --num_gpus "$NPROC" --module training.step1_supervised_finetuning.main \
   --model_name_or_path tiny-llama --data_path bundled --num_examples 600 --max_seq_len 96 \
   --per_device_train_batch_size 8 --learning_rate 1e-3 --dtype fp32 \
   --zero_stage 2 --output_dir "$OUTPUT"
