#!/usr/bin/env bash
# Step 1 on several nodes (e.g. 8 x 8 GPUs): OPT-66B, ZeRO-3. The hostfile lists the nodes
# ("host slots=8" per line), as the deepspeed launcher expects.
OUTPUT=${1:-output/step1_opt66b}
HOSTFILE=${2:-/job/hostfile}
deepspeed --hostfile "$HOSTFILE" --module training.step1_supervised_finetuning.main \
   --model_name_or_path facebook/opt-66b \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 --max_seq_len 512 \
   --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 1 \
   --learning_rate 9.65e-6 --weight_decay 0.1 --num_train_epochs 2 --lr_scheduler_type cosine \
   --num_warmup_steps 0 --gradient_checkpointing --zero_stage 3 --dtype bf16 \
   --enable_tensorboard --output_dir "$OUTPUT"
