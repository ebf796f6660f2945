#!/usr/bin/env bash
# Step 1 on one node of 8 GPUs: OPT-13B, ZeRO-3.
OUTPUT=${1:-output/step1_opt13b}
deepspeed --num_gpus 8 --module training.step1_supervised_finetuning.main \
   --model_name_or_path facebook/opt-13b \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 --max_seq_len 512 \
   --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 1 \
   --learning_rate 1e-4 --weight_decay 0.0 --num_train_epochs 1 --lr_scheduler_type cosine \
   --num_warmup_steps 0 --gradient_checkpointing --zero_stage 3 --dtype bf16 \
   --enable_tensorboard --output_dir "$OUTPUT"
