#!/usr/bin/env bash
# Step 2 on one GPU: OPT-350M reward model. Run from the repository root:
#   bash training/step2_reward_model_finetuning/training_scripts/single_gpu/run_350m.sh [output_dir]
OUTPUT=${1:-output/step2_opt350m}
deepspeed --num_gpus 1 --module training.step2_reward_model_finetuning.main \
   --model_name_or_path facebook/opt-350m --data_path Dahoas/rm-static --data_split 2,4,4 \
   --max_seq_len 512 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 \
   --learning_rate 5e-5 --weight_decay 0.1 --num_train_epochs 1 --num_warmup_steps 0 \
   --zero_stage 0 --dtype bf16 --gradient_checkpointing --enable_tensorboard --output_dir "$OUTPUT"
