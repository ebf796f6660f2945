#!/usr/bin/env bash
# Step 1 on one GPU with LoRA: OPT-1.3B, only the LoRA matrices trained, merged on export.
# DeepSpeed-Chat's LoRA learning rate 5e-4 is tuned for its scale 1/rank: --lora_alpha 1 gives that
# scale here (the default alpha = rank scales by 1 and would move the weights 128x further).
OUTPUT=${1:-output/step1_opt1.3b_lora}
deepspeed --num_gpus 1 --module training.step1_supervised_finetuning.main \
   --model_name_or_path facebook/opt-1.3b \
   --data_path Dahoas/rm-static --data_split 2,4,4 --max_seq_len 512 \
   --per_device_train_batch_size 16 --per_device_eval_batch_size 16 \
   --learning_rate 1e-3 --lora_learning_rate 5e-4 --num_train_epochs 1 \
   --lora_dim 128 --lora_alpha 1 --lora_module_name decoder.layers. --only_optimize_lora \
   --zero_stage 0 --dtype bf16 --output_dir "$OUTPUT"
