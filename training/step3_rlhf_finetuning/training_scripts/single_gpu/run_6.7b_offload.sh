#!/usr/bin/env bash
# Step 3 on one GPU too small for five 6.7B models: actor and critic ZeRO-3 with CPU offload of
# parameters and optimizer state, reference and reward model kept in CPU memory.
ACTOR=${1:?actor path}; CRITIC=${2:?critic path}; OUTPUT=${3:-output/step3_opt6.7b_offload}
deepspeed --num_gpus 1 --module training.step3_rlhf_finetuning.main \
   --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
   --data_path Dahoas/rm-static --max_prompt_seq_len 256 --max_answer_seq_len 256 \
   --per_device_generation_batch_size 4 --per_device_training_batch_size 4 \
   --actor_zero_stage 3 --critic_zero_stage 3 --offload --offload_reference_model --offload_reward_model \
   --actor_gradient_checkpointing --critic_gradient_checkpointing --dtype bf16 --output_dir "$OUTPUT"
