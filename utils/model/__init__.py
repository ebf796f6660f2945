"""Model utilities: built-in models, loading, dtype/dropout handling, LoRA."""
from utils.model.loading import (auto_dtype_name, load_causal_lm, load_tokenizer, resolve_dtype,
                                 require_same_tokenizer, resolve_dtype_name, set_dropout,
                                 tokenizers_match)
from utils.model.lora import (AdapterOffReference, AdaptersOff, apply_lora, lora_fan_in_fan_out, lora_scaling,
                              lora_target_modules, merge_lora_state_dict)
from utils.model.resolve import BUILTIN_MODELS, resolve_model_path
from utils.model.reward_model import (RewardModel, divergence_loss, end_scores, last_token_index,
                                      load_reward_model, pair_metrics, pairwise_loss)
from utils.model.tiny import TINY_FAMILIES

__all__ = [
    "BUILTIN_MODELS", "TINY_FAMILIES", "resolve_model_path", "load_tokenizer", "load_causal_lm",
    "set_dropout", "resolve_dtype", "resolve_dtype_name", "auto_dtype_name", "tokenizers_match", "require_same_tokenizer", "apply_lora", "AdaptersOff",
    "AdapterOffReference", "lora_scaling",
    "lora_fan_in_fan_out", "RewardModel", "load_reward_model", "end_scores", "last_token_index",
    "pairwise_loss", "pair_metrics", "divergence_loss", "lora_target_modules", "merge_lora_state_dict",
]
