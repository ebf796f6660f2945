#!/usr/bin/env bash
# Step 2 on several nodes (HOSTFILE lists them), ZeRO-3 with offload.
OUTPUT=${1:-output/step2_opt350m_multi}
deepspeed --hostfile "${HOSTFILE:-hostfile}" --module training.step2_reward_model_finetuning.main \
   --model_name_or_path facebook/opt-350m --data_path Dahoas/rm-static Dahoas/full-hh-rlhf \
   --max_seq_len 512 --per_device_train_batch_size 4 --learning_rate 5e-5 \
   --zero_stage 3 --offload --dtype bf16 --output_dir "$OUTPUT"
