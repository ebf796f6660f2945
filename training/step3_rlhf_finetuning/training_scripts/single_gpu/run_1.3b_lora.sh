#!/usr/bin/env bash
# Step 3 on one GPU with LoRA on actor and critic (only the LoRA matrices train; the hybrid
# engine generates with LoRA fused into an inference copy). Alpha 1: the scale 1/rank that
# DeepSpeed-Chat's LoRA learning rate 5e-4 is tuned for.
ACTOR=${1:?actor path}; CRITIC=${2:?critic path}; OUTPUT=${3:-output/step3_opt1.3b_lora}
deepspeed --num_gpus 1 --module training.step3_rlhf_finetuning.main \
   --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
   --data_path Dahoas/rm-static --max_prompt_seq_len 256 --max_answer_seq_len 256 \
   --per_device_generation_batch_size 16 --per_device_training_batch_size 16 \
   --actor_lora_dim 128 --actor_lora_alpha 1 --actor_lora_module_name decoder.layers. \
   --critic_lora_dim 128 --critic_lora_alpha 1 \
   --only_optimize_lora --actor_lora_learning_rate 5e-4 --critic_lora_learning_rate 5e-4 \
   --dtype bf16 --output_dir "$OUTPUT"
