"""The pure loss math (utils/rl_math.py) against values worked out by hand."""
from __future__ import annotations

import math

import torch

from utils.rl_math import (answer_token_mask, dpo_loss, log_probs_from_logits, masked_mean,
                           sequence_log_probs)


def test_log_probs_match_log_softmax():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    want = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(log_probs_from_logits(logits, labels), want)


def test_log_probs_of_a_two_token_vocabulary_by_hand():
    # logits (0, ln 3): p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    got = log_probs_from_logits(logits, torch.tensor([[0, 1]]))
    torch.testing.assert_close(got, torch.tensor([[math.log(0.25), math.log(0.75)]]))


def test_log_probs_of_bf16_logits_are_fp32():
    logits = torch.randn(1, 3, 5).bfloat16()
    assert log_probs_from_logits(logits, torch.zeros(1, 3, dtype=torch.long)).dtype == torch.float32


def test_masked_mean_ignores_masked_entries_and_empty_rows():
    values = torch.tensor([[1.0, 2.0, 100.0], [5.0, 7.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(values, mask).item() == 1.5
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 0.0]))


def test_answer_token_mask_marks_predictions_of_answer_tokens():
    # row 0: prompt of 2 tokens, answer of 2, one pad; row 1: prompt of 3, answer of 2
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    mask = answer_token_mask(attention, torch.tensor([2, 3]))
    # position t predicts token t+1: answer tokens are 2,3 (row 0) and 3,4 (row 1)
    assert mask.tolist() == [[False, True, True, False], [False, False, True, True]]


def test_sequence_log_probs_sum_the_answer_tokens():
    logits = torch.zeros(1, 4, 2)  # uniform over 2 tokens: every token has log-prob ln 1/2
    ids = torch.tensor([[0, 1, 1, 0]])
    mask = torch.tensor([[False, True, True]])
    assert math.isclose(sequence_log_probs(logits, ids, mask).item(), 2 * math.log(0.5), rel_tol=1e-6)


def test_dpo_loss_by_hand():
    # beta 0.5: chosen reward 0.5 * (-1 - -2) = 0.5, rejected 0.5 * (-3 - -2) = -0.5, margin 1
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]),
                                      torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert chosen.item() == 0.5 and rejected.item() == -0.5
    assert math.isclose(loss.item(), -math.log(1 / (1 + math.exp(-1.0))), rel_tol=1e-6)


def test_dpo_loss_with_label_smoothing_by_hand():
    # margin 1 as above; e = 0.2: 0.8 * -log s(1) + 0.2 * -log s(-1)
    loss, _, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                          torch.tensor([-2.0]), beta=0.5, label_smoothing=0.2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert math.isclose(loss.item(), -0.8 * math.log(sig(1)) - 0.2 * math.log(sig(-1)), rel_tol=1e-6)


def test_dpo_loss_is_ln2_when_policy_equals_reference_and_averages_pairs():
    lp = torch.tensor([-4.0, -1.0])
    loss, chosen, rejected = dpo_loss(lp, lp.flip(0), lp, lp.flip(0), beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert chosen.abs().sum() == 0 and rejected.abs().sum() == 0


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    loss, _, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=1.0)
    loss.backward()
    # d/dx -log s(x) at 0 = -1/2, times +-beta
    assert chosen.grad.item() == -0.5 and rejected.grad.item() == 0.5
