"""The pure loss math (utils/rl_math.py) against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from utils.model import TINY_FAMILIES

from utils.rl_math import (answer_token_mask, dpo_loss, log_probs_from_logits, masked_mean,
                           sequence_log_probs, token_log_probs)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_in_chunks_equal_log_softmax_and_its_gradient(monkeypatch, dtype, temperature):
    """The chunked function against autograd through log_softmax: log-probs, entropy and the
    gradient, with chunks of 2 rows (7 rows: the last chunk short)."""
    import utils.rl_math as rl_math
    monkeypatch.setattr(rl_math, "CHUNK_ELEMENTS", 2 * 11)
    base = (3 * torch.randn(7, 12)).to(dtype)
    labels = torch.randint(0, 11, (7,))
    weights = torch.randn(7)
    ours = base.clone().requires_grad_(True)
    # sliced (non-contiguous), as the answers' logits are
    log_probs, entropy = rl_math.token_log_probs(ours[:, :11], labels, temperature)
    (weights * log_probs).sum().backward()
    ref = base.clone().requires_grad_(True)
    log_softmax = (ref[:, :11].float() / temperature).log_softmax(-1)
    want = log_softmax.gather(-1, labels[:, None]).squeeze(-1)
    (weights * want).sum().backward()
    assert log_probs.dtype == entropy.dtype == torch.float32 and ours.grad.dtype == dtype
    torch.testing.assert_close(log_probs, want.detach())
    torch.testing.assert_close(entropy, -(log_softmax.exp() * log_softmax).sum(-1).detach())
    torch.testing.assert_close(ours.grad, ref.grad)
    assert not entropy.requires_grad


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


# ---- PPO

from utils.rl_math import (adaptive_kl_coef, aggregate_loss, clipped_surrogate,  # noqa: E402
                           gae_advantages, group_advantages, group_residuals, k3_kl, kl_penalized_rewards,
                           policy_loss, value_loss, whiten)
from utils.rl_math import answer_mask as answer_mask_of  # noqa: E402


def test_answer_mask_stops_at_the_first_eos_even_when_pad_is_eos():
    eos = pad = 2
    answers = torch.tensor([[5, 6, 2, 2], [2, 2, 2, 2], [5, 6, 7, 8]])
    assert answer_mask_of(answers, eos, pad).long().tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert answer_mask_of(torch.tensor([[5, 0, 0]]), None, 0).long().tolist() == [[1, 0, 0]]
    assert answer_mask_of(torch.tensor([[5, 9, 3]]), [9, 3], 0).long().tolist() == [[1, 1, 0]]


def test_kl_penalized_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = kl_penalized_rewards(logp, ref, torch.tensor([2.0, -9.0]), mask, kl_coef=0.1, clip_reward=5.0)
    # row 0: -0.1 * (0.5, 0), score 2 on the last answer token (index 1); masked token 0
    # row 1: no KL, score clipped to -5 on index 2
    torch.testing.assert_close(got, torch.tensor([[-0.05, 2.0, 0.0], [0.0, 0.0, -5.0]]))


def test_kl_penalized_rewards_of_a_row_without_answer_tokens_stay_zero():
    got = kl_penalized_rewards(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([3.0]),
                               torch.zeros(1, 2), kl_coef=0.1, clip_reward=5.0)
    assert got.abs().sum() == 0


def _gae_loop(values, rewards, length, gamma, lam):
    """cleanrl-style reference: one row, plain Python."""
    adv, last = [0.0] * len(values), 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_adaptive_kl_coef_by_hand():
    # KL 1.1 against a target of 1: error 0.1, a rollout of 50 answers over a horizon of 100
    assert adaptive_kl_coef(0.1, 1.1, 1.0, 50, 100) == pytest.approx(0.1 * (1 + 0.1 * 0.5))
    assert adaptive_kl_coef(0.1, 0.5, 1.0, 50, 100) == pytest.approx(0.1 * (1 - 0.5 * 0.2 * 2 / 2))  # -0.5 -> -0.2
    assert adaptive_kl_coef(0.1, 9.0, 1.0, 100, 100) == pytest.approx(0.12)  # clipped at +0.2
    assert adaptive_kl_coef(0.1, 1.0, 1.0, 100, 100) == pytest.approx(0.1)


def test_gae_by_hand_one_token():
    adv, ret = gae_advantages(torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 1.0, 0.95)
    assert adv.item() == 1.5 and ret.item() == 2.0  # delta = 2 + 0 - 0.5; return = reward


def test_gae_matches_the_plain_loop_for_rows_of_different_lengths():
    torch.manual_seed(0)
    values, rewards = torch.randn(4, 6), torch.randn(4, 6)
    lengths = [6, 3, 1, 4]
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None])
    adv, ret = gae_advantages(values, rewards, mask, gamma=0.9, lam=0.8)
    for row, n in enumerate(lengths):
        want = _gae_loop(values[row].tolist(), rewards[row].tolist(), n, 0.9, 0.8)
        torch.testing.assert_close(adv[row], torch.tensor(want))
        torch.testing.assert_close(ret[row, :n], adv[row, :n] + values[row, :n])
        assert ret[row, n:].abs().sum() == 0


def test_policy_loss_clips_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    loss = policy_loss(new, old, adv, mask, clip=0.2)
    assert abs(loss.item() - (-1.2 - 0.5 + 2.2) / 3) < 1e-6
    masked = policy_loss(new, old, adv, torch.tensor([[1, 0, 0]]), clip=0.2)
    assert abs(masked.item() - (-1.2)) < 1e-6


def test_value_loss_clips_by_hand():
    old, ret = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    values = torch.tensor([[1.5, 1.5]])
    # token 0: v-R = -0.5, clipped v = 1.2 -> -0.8: max(0.25, 0.64) = 0.64
    # token 1: v-R = 1.5, clipped 1.2 -> 1.44: max(2.25, 1.44) = 2.25
    loss = value_loss(values, old, ret, torch.ones(1, 2), clip=0.2)
    assert abs(loss.item() - 0.5 * (0.64 + 2.25) / 2) < 1e-6


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])
    torch.testing.assert_close(group_advantages(scores, 2, "rloo"), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    # grpo: (s - mean) / (std + eps); the pair (1, 0) has std 0.7071
    grpo = group_advantages(scores, 2, "grpo")
    torch.testing.assert_close(grpo, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (2 ** -0.5 + 1e-6))
    # Dr. GRPO: no std
    torch.testing.assert_close(group_advantages(scores, 2, "grpo", "none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # batch: the std of all four scores
    torch.testing.assert_close(group_advantages(scores, 2, "grpo", "batch"),
                               torch.tensor([0.5, -0.5, 0.0, 0.0]) / (scores.std() + 1e-6))
    # rloo: leave-one-out over 3
    torch.testing.assert_close(group_residuals(torch.tensor([3.0, 0.0, 0.0]), 3, "rloo"),
                               torch.tensor([3.0, -1.5, -1.5]))


def test_grpo_does_not_turn_kl_noise_into_advantages_when_scores_tie():
    """Four answers all scored 1 carry no signal: their advantages are 0 with the KL as a loss
    term, and only the (small, unscaled) centred KL return with the KL in the reward. Dividing
    the KL-penalized return by the group's std used to give [-0.23, 0.81, -1.32, 0.74]-like
    unit-size advantages."""
    scores = torch.ones(4)
    kl_returns = torch.tensor([-0.01, 0.02, -0.05, 0.03])
    assert group_advantages(scores, 4, "grpo").abs().sum() == 0
    assert group_advantages(torch.full((4,), 0.3), 4, "grpo").abs().sum() == 0  # 0.3 * 4 / 4 != 0.3 in float
    shaped = group_advantages(scores, 4, "grpo", kl_returns=kl_returns)
    torch.testing.assert_close(shaped, kl_returns - kl_returns.mean())
    assert shaped.abs().max() < 0.05
    for kind in ("rloo", "grpo"):
        assert group_advantages(torch.full((3,), 0.7), 3, kind).abs().sum() == 0


def test_k3_kl_by_hand_and_zero_on_masked_positions():
    logp = torch.tensor([[-1.0, -2.0, 50.0]])
    ref = torch.tensor([[-1.5, -2.0, -50.0]])
    got = k3_kl(logp, ref, torch.tensor([[1, 1, 0]]))
    d = -0.5  # ref - logp of token 0
    torch.testing.assert_close(got, torch.tensor([[math.exp(d) - d - 1, 0.0, 0.0]]))
    assert torch.isfinite(got).all() and (got >= 0).all()


def test_a_huge_ratio_on_a_masked_position_does_not_make_the_loss_nan():
    """The log-ratio is masked before exp: a padding position whose log-probs differ by 1000
    used to give exp(1000) * 0 = inf * 0 = NaN, and the whole micro-batch was skipped."""
    new = torch.tensor([[-1.0, 500.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -500.0]])
    mask = torch.tensor([[1, 0]])
    loss = policy_loss(new, old, torch.tensor([[1.0, 1.0]]), mask, clip=0.2)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert torch.isfinite(new.grad).all() and new.grad[0, 1] == 0  # was NaN
    negative = policy_loss(new, old, torch.tensor([[1.0, -1.0]]), mask, clip=0.2)
    assert negative.item() == pytest.approx(-1.0)  # was inf * 0 = NaN


def test_clip_higher_widens_only_the_upper_clip():
    old, new = torch.zeros(1, 2), torch.log(torch.tensor([[1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0]])
    got = clipped_surrogate(new, old, adv, torch.ones(1, 2), clip=0.2, clip_high=0.28)
    # token 0: max(-1.5, -1.28) = -1.28; token 1: max(0.5, 0.8) = 0.8
    torch.testing.assert_close(got, torch.tensor([[-1.28, 0.8]]))


def test_loss_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate_loss(per_token, mask, "token").item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "sequence").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(per_token, mask, "dr_grpo", max_len=8).item() == pytest.approx(10 / (2 * 8))
    assert aggregate_loss(per_token, mask, "dapo", normalizer=5.0).item() == pytest.approx(10 / 5)
    with pytest.raises(ValueError):
        aggregate_loss(per_token, mask, "dapo")


def test_whiten_and_entropy():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    w = whiten(x, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
    labels = torch.tensor(0)
    assert abs(token_log_probs(torch.zeros(4), labels)[1].item() - math.log(4)) < 1e-6
    assert token_log_probs(torch.tensor([0.0, -1e4]), labels)[1].item() < 1e-6


def test_answer_width_is_the_last_used_column():
    from utils.rl_math import answer_width
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert answer_width(mask) == 3
    assert answer_width(torch.ones(2, 4, dtype=torch.bool)) == 4
    assert answer_width(torch.zeros(1, 4, dtype=torch.bool)) == 1


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_padding_after_the_answers_does_not_change_their_log_probs(family):
    """Why Step 3 may cut the columns after the longest answer: a causal LM's logits at the real
    positions do not depend on later (masked) columns. And the answer columns asked of lm_logits
    (logits_to_keep given positions, where the family takes it) are the full forward's."""
    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
    from utils.model.forward import lm_logits
    path = resolve_model_path(f"tiny-{family}")
    model = load_causal_lm(path, load_tokenizer(path)).eval()
    torch.manual_seed(0)
    seq = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(seq)
    mask[0, :2] = 0  # left-padded prompt
    mask[:, 9:] = 0  # padding after the answers
    with torch.no_grad():
        full = lm_logits(model, seq, mask, columns=slice(5, 8))  # predicting answer columns 6..8 (prompt 6)
        cut = lm_logits(model, seq[:, :9], mask[:, :9], columns=slice(5, -1))
        every = lm_logits(model, seq, mask)
    assert full.is_contiguous() and full.shape == (2, 3, every.shape[-1])
    torch.testing.assert_close(full, cut, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, every[:, 5:8], atol=1e-5, rtol=1e-5)


def test_truncated_is_weights_by_hand():
    from utils.rl_math import truncated_is_weights
    lp = torch.tensor([[math.log(0.5), math.log(0.9), 0.0]])
    rollout = torch.tensor([[math.log(0.25), math.log(0.3), 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    w = truncated_is_weights(lp, rollout, mask, cap=2.5)
    # 0.5 / 0.25 = 2, 0.9 / 0.3 = 3 capped at 2.5, masked 0 (a huge log-ratio there gives no inf)
    assert w[0].tolist() == pytest.approx([2.0, 2.5, 0.0])


def test_is_weights_folded_into_advantages_weigh_the_clipped_surrogate():
    """credit() multiplies the advantages by the TIS weights: for w >= 0 that is the per-token
    clipped surrogate times w, whichever side of the clip a token is on."""
    ratio_logs = torch.tensor([[0.5, -0.5, 0.05, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    w = torch.tensor([[0.3, 2.0, 1.0, 0.0]])
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    weighted = clipped_surrogate(ratio_logs, old, adv * w, mask, 0.2)
    assert torch.allclose(weighted, clipped_surrogate(ratio_logs, old, adv, mask, 0.2) * w)
