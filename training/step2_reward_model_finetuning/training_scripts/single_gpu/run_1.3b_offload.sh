#!/usr/bin/env bash
# Step 2 on one GPU too small for the model: an OPT-1.3B reward model with ZeRO-3 and CPU
# offload of parameters and optimizer state.
OUTPUT=${1:-output/step2_opt1.3b_offload}
deepspeed --num_gpus 1 --module training.step2_reward_model_finetuning.main \
   --model_name_or_path facebook/opt-1.3b --data_path Dahoas/rm-static --data_split 2,4,4 \
   --max_seq_len 512 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 \
   --gradient_accumulation_steps 2 --learning_rate 5e-5 --weight_decay 0.1 --num_train_epochs 1 \
   --gradient_checkpointing --zero_stage 3 --offload --dtype bf16 --output_dir "$OUTPUT"
