#!/usr/bin/env bash
# Step 2 on one GPU with LoRA (the value head always trains in full). --lora_alpha 1: the scale
# 1/rank that DeepSpeed-Chat's LoRA learning rate 5e-4 is tuned for.
OUTPUT=${1:-output/step2_opt350m_lora}
deepspeed --num_gpus 1 --module training.step2_reward_model_finetuning.main \
   --model_name_or_path facebook/opt-350m --data_path Dahoas/rm-static --max_seq_len 512 \
   --per_device_train_batch_size 16 --lora_dim 64 --lora_alpha 1 --only_optimize_lora --lora_learning_rate 5e-4 \
   --zero_stage 0 --dtype bf16 --output_dir "$OUTPUT"
