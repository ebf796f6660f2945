#!/usr/bin/env bash
# Step 1 on one GPU: OPT-1.3B, ZeRO-0, bf16. Run from the repository root:
#   bash training/step1_supervised_finetuning/training_scripts/single_gpu/run_1.3b.sh [output_dir]
OUTPUT=${1:-output/step1_opt1.3b}
mkdir -p "$(dirname "$OUTPUT")"
deepspeed --num_gpus 1 --module training.step1_supervised_finetuning.main \
   --model_name_or_path facebook/opt-1.3b \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 --max_seq_len 512 \
   --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --gradient_accumulation_steps 1 \
   --learning_rate 9.65e-6 --weight_decay 0.0 --num_train_epochs 1 --lr_scheduler_type cosine \
   --num_warmup_steps 0 --seed 1234 --zero_stage 0 --dtype bf16 --gradient_checkpointing \
   --enable_tensorboard --output_dir "$OUTPUT"
