#!/usr/bin/env bash
# Step 3 on 8 nodes x 8 GPUs (hostfile lists them): OPT-66B actor, OPT-350M critic, ZeRO-3,
# generation tensor-parallel over 4 GPUs.
ACTOR=${1:?actor path}; CRITIC=${2:?critic path}; OUTPUT=${3:-output/step3_opt66b}
HOSTFILE=${HOSTFILE:-hostfile}
deepspeed --hostfile "$HOSTFILE" --module training.step3_rlhf_finetuning.main \
   --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --max_prompt_seq_len 256 --max_answer_seq_len 256 \
   --per_device_generation_batch_size 4 --per_device_training_batch_size 4 \
   --actor_zero_stage 3 --critic_zero_stage 3 --inference_tp_size 4 --tp_gather_partition_size 2 \
   --actor_gradient_checkpointing --critic_gradient_checkpointing --dtype bf16 --output_dir "$OUTPUT"
