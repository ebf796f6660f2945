#!/usr/bin/env bash
# Step 3 on one 8-GPU node: OPT-13B actor, OPT-350M critic, actor ZeRO-3, generation
# tensor-parallel over 2 GPUs.
ACTOR=${1:?actor path}; CRITIC=${2:?critic path}; OUTPUT=${3:-output/step3_opt13b}
deepspeed --num_gpus 8 --module training.step3_rlhf_finetuning.main \
   --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 --max_prompt_seq_len 256 --max_answer_seq_len 256 \
   --per_device_generation_batch_size 4 --per_device_training_batch_size 4 \
   --actor_zero_stage 3 --critic_zero_stage 3 \
   --inference_tp_size 2 --tp_gather_partition_size 4 --actor_gradient_checkpointing \
   --enable_ema --dtype bf16 --enable_tensorboard --output_dir "$OUTPUT"
