#!/usr/bin/env bash
# Step 1 on a CPU machine: the real pretrained SmolLM2-135M-Instruct on the bundled task,
# ZeRO-2, bf16, two CPU processes (gloo). A few minutes on 2 cores.
OUTPUT=${1:-output/step1_smollm2_cpu}
NPROC=${2:-1}
deepspeed --num_gpus "$NPROC" --module training.step1_supervised_finetuning.main \
   --model_name_or_path smollm2-135m --data_path bundled --data_split 2,4,4 \
   --num_examples 3000 --max_seq_len 128 --per_device_train_batch_size 8 \
   --learning_rate 5e-5 --num_train_epochs 1 --num_warmup_steps 5 \
   --zero_stage 2 --dtype bf16 --output_dir "$OUTPUT"
