"""The step losses of utils/losses.py against hand computations: SFT cross entropy, the reward
model's pairwise and divergence losses with their accuracy, and DPO on a batch (policy and
reference log-probs from a forward pass), including the reference that is the policy with its
LoRA adapters switched off."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from utils.data import DataCollatorReward, DataCollatorSFT
from utils.losses import causal_lm_loss, dpo_batch_loss, dpo_pair_loss, reward_loss, reward_scores, sft_loss
from utils.model import AdaptersOff, apply_lora, load_causal_lm, load_tokenizer, resolve_model_path

PAD = 0


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


class BigramLM:
    """A causal LM whose next-token distribution depends on the current token only:
    p(next | cur) = probs[cur][next], so every log-prob is a log of a number in the table."""

    def __init__(self, probs):
        self.table = torch.tensor(probs, dtype=torch.float64).log()

    def __call__(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids])


class FixedValues:
    """A reward model (utils/model/reward_model.py's interface) returning given per-token values."""

    def __init__(self, values):
        self.values = torch.tensor(values)

    def __call__(self, input_ids, attention_mask):
        return self.values


# ---------------------------------------------------------------- Step 1

def test_sft_loss_is_the_mean_cross_entropy_of_the_labelled_next_tokens():
    model = BigramLM([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    # two examples; -100 masks the prompt token and the padding
    batch = DataCollatorSFT(PAD)([{"input_ids": torch.tensor([1, 2, 2]), "labels": torch.tensor([-100, 2, 2])},
                                  {"input_ids": torch.tensor([2, 1]), "labels": torch.tensor([2, 1])}])
    loss, samples, extras = sft_loss(model, batch)
    # predicted: 1 -> 2 (0.2), 2 -> 2 (0.8) in the first row; 2 -> 1 (0.1) in the second
    assert loss.item() == pytest.approx(-(math.log(0.2) + math.log(0.8) + math.log(0.1)) / 3, rel=1e-9)
    assert (samples, extras) == (2, {})


def test_causal_lm_loss_in_fp32_from_bf16_logits():
    logits = torch.randn(2, 5, 7).to(torch.bfloat16)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100
    exact = causal_lm_loss(logits.float(), labels)
    assert causal_lm_loss(logits, labels, fp32=True).dtype == torch.float32
    assert causal_lm_loss(logits, labels, fp32=True).item() == pytest.approx(exact.item(), rel=1e-6)


# ---------------------------------------------------------------- Step 2 (reward model)

def pairs_batch(chosen: list[list[int]], rejected: list[list[int]], prompt_lengths=None) -> dict:
    items = [{"chosen_input_ids": torch.tensor(c), "rejected_input_ids": torch.tensor(r)}
             for c, r in zip(chosen, rejected)]
    for item, length in zip(items, prompt_lengths or ()):
        item["prompt_length"] = length
    return DataCollatorReward(PAD)(items)


def test_reward_pairwise_loss_and_accuracy_on_the_last_real_tokens():
    batch = pairs_batch([[5, 6, 7], [5, 6]], [[5, 8], [5, 9, 9]])  # rows: chosen 0, 1, rejected 0, 1
    values = [[0.0, 0.0, 2.0],    # chosen 0 ends at column 2: reward 2.0
              [0.0, -1.0, 9.0],   # chosen 1 ends at column 1: -1.0 (column 2 is padding)
              [0.0, 1.5, 9.0],    # rejected 0: 1.5
              [0.0, 0.0, 0.5]]    # rejected 1: 0.5
    model = FixedValues(values)
    chosen, rejected, _ = reward_scores(model, batch)
    assert chosen.tolist() == [2.0, -1.0] and rejected.tolist() == [1.5, 0.5]
    loss, pairs, extras = reward_loss(model, batch)
    assert loss.item() == pytest.approx(-(log_sigmoid(0.5) + log_sigmoid(-1.5)) / 2, rel=1e-6)
    assert pairs == 2
    assert extras == {"accuracy": 0.5}


def test_reward_divergence_loss_averages_from_where_the_answers_differ():
    batch = pairs_batch([[5, 6, 7]], [[5, 6, 8, 9]])  # they differ from column 2; the longer ends at 3
    chosen_values = [0.0, 4.0, 1.0, 3.0]  # column 3 is chosen's padding, still in the span
    rejected_values = [9.0, 9.0, 0.0, 1.0]
    loss, pairs, extras = reward_loss(FixedValues([chosen_values, rejected_values]), batch, kind="divergence")
    assert loss.item() == pytest.approx(-(log_sigmoid(1.0) + log_sigmoid(2.0)) / 2, rel=1e-6)
    assert pairs == 1
    assert extras == {"accuracy": 0.0}  # last-token rewards: chosen 1.0 vs rejected 1.0, a tie


# ---------------------------------------------------------------- DPO

POLICY = [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]
UNIFORM = [[1 / 3] * 3] * 3


def dpo_batch() -> dict:
    # one pair after the prompt [1]: chosen answer [2, 2], rejected answer [1, 2, 1]
    return pairs_batch([[1, 2, 2]], [[1, 1, 2, 1]], prompt_lengths=[1])


def test_dpo_loss_is_minus_log_sigmoid_of_the_reward_margin():
    beta = 0.5
    policy_chosen = math.log(0.2) + math.log(0.8)                    # 1 -> 2 -> 2
    policy_rejected = math.log(0.6) + math.log(0.2) + math.log(0.1)  # 1 -> 1 -> 2 -> 1
    chosen_reward = beta * (policy_chosen - 2 * math.log(1 / 3))
    rejected_reward = beta * (policy_rejected - 3 * math.log(1 / 3))
    loss, pairs, extras = dpo_batch_loss(BigramLM(POLICY), BigramLM(UNIFORM), dpo_batch(), beta)
    assert loss.item() == pytest.approx(-log_sigmoid(chosen_reward - rejected_reward), rel=1e-6)
    assert pairs == 1
    assert extras["accuracy"] == 1.0  # the policy favours the chosen answer more than the reference
    assert extras["chosen_reward"] == pytest.approx(chosen_reward, rel=1e-6)
    assert extras["rejected_reward"] == pytest.approx(rejected_reward, rel=1e-6)


def test_dpo_label_smoothing_mixes_in_the_flipped_label():
    beta, eps = 0.1, 0.2
    _, chosen, rejected = dpo_pair_loss(BigramLM(POLICY), BigramLM(UNIFORM), dpo_batch(), beta)
    margin = (chosen - rejected).item()
    loss, _, _ = dpo_pair_loss(BigramLM(POLICY), BigramLM(UNIFORM), dpo_batch(), beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(-(1 - eps) * log_sigmoid(margin) - eps * log_sigmoid(-margin), rel=1e-6)


def test_dpo_takes_no_gradient_through_the_reference():
    policy_table = torch.tensor(POLICY).log().requires_grad_(True)
    reference_table = torch.tensor(UNIFORM).log().requires_grad_(True)

    def lm(table):
        return lambda input_ids, attention_mask: SimpleNamespace(logits=table[input_ids])

    loss, _, _ = dpo_pair_loss(lm(policy_table), lm(reference_table), dpo_batch(), 0.1)
    loss.backward()
    assert policy_table.grad is not None and policy_table.grad.abs().sum() > 0
    assert reference_table.grad is None


def test_dpo_reference_with_adapters_off_is_the_model_before_lora():
    """--only_optimize_lora without a reference: the reference is the policy with its adapters
    off. At the start (LoRA's B = 0) policy and reference agree: loss log 2, rewards 0; once the
    adapters moved, the reference still gives the base model's log-probs."""
    path = resolve_model_path("tiny-llama")
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = load_causal_lm(path, tokenizer).eval()
    batch = pairs_batch([[5, 6, 7, 8], [5, 9, 10]], [[5, 6, 11], [5, 12, 13, 14]], prompt_lengths=[2, 1])
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    policy = apply_lora(model, 4, only_optimize_lora=True)
    loss, chosen, rejected = dpo_pair_loss(policy, AdaptersOff(policy), batch, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert chosen.abs().max().item() < 1e-6 and rejected.abs().max().item() < 1e-6
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        off = AdaptersOff(policy)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        on = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(off, base)
    assert (on - base).abs().max().item() > 1e-3
