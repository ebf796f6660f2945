#!/usr/bin/env bash
# Step 3 on this CPU with the built-in tiny models (random init: checks the plumbing in ~1 min).
OUTPUT=${1:-output/step3_tiny}
python -m training.step3_rlhf_finetuning.main \
   --actor_model_name_or_path tiny-llama --critic_model_name_or_path tiny-llama \
   --num_examples 600 --per_device_generation_batch_size 4 --per_device_training_batch_size 4 \
   --max_prompt_seq_len 64 --max_answer_seq_len 16 --num_warmup_steps 0 \
   --enable_test_mode --test_stop_step 4 --enable_ema --dtype fp32 --output_dir "$OUTPUT"
