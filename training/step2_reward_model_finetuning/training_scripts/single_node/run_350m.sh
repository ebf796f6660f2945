#!/usr/bin/env bash
# Step 2 on one 8-GPU node: OPT-350M reward model on four public preference sets, ZeRO-2.
OUTPUT=${1:-output/step2_opt350m_node}
deepspeed --num_gpus 8 --module training.step2_reward_model_finetuning.main \
   --model_name_or_path facebook/opt-350m \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 --max_seq_len 512 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 \
   --learning_rate 5e-5 --weight_decay 0.1 --zero_stage 2 --dtype bf16 --output_dir "$OUTPUT"
