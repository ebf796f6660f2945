#!/usr/bin/env bash
# DPO (the alternative second step) on this CPU from the SmolLM2 Step 1 output.
MODEL=${1:-output/step1_sft}; OUTPUT=${2:-output/step2_dpo}
python -m training.step2_dpo_finetuning.main --model_name_or_path "$MODEL" \
   --data_path bundled --num_examples 2000 --max_seq_len 128 --per_device_train_batch_size 8 \
   --learning_rate 5e-6 --beta 0.1 --zero_stage 0 --dtype auto --output_dir "$OUTPUT"
