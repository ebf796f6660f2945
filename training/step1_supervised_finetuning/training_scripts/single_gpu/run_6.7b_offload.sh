#!/usr/bin/env bash
# Step 1 on one GPU too small for the model: OPT-6.7B with ZeRO-3 and CPU offload of
# parameters and optimizer state.
OUTPUT=${1:-output/step1_opt6.7b_offload}
deepspeed --num_gpus 1 --module training.step1_supervised_finetuning.main \
   --model_name_or_path facebook/opt-6.7b \
   --data_path Dahoas/rm-static --data_split 2,4,4 --max_seq_len 512 \
   --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 4 \
   --learning_rate 9.65e-6 --num_train_epochs 1 --gradient_checkpointing \
   --zero_stage 3 --offload --dtype bf16 --output_dir "$OUTPUT"
