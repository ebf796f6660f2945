"""Reward model: value at the right token under any padding, loss/metrics by hand, save/reload."""
from __future__ import annotations

import math

import pytest
import torch

from utils.config import ConfigError
from utils.model import (end_scores, last_token_index, load_reward_model, load_tokenizer,
                         pair_metrics, pairwise_loss)


def test_last_token_for_right_left_and_leading_pad_as_bos():
    mask = torch.tensor([[1, 1, 1, 0, 0],   # right padded
                         [0, 0, 1, 1, 1],   # left padded
                         [1, 1, 1, 1, 1],   # full
                         [0, 1, 1, 0, 0]])  # left and right (prompt left-padded, answer short)
    assert last_token_index(mask).tolist() == [2, 4, 4, 2]
    values = torch.arange(20, dtype=torch.float).view(4, 5)
    assert end_scores(values, mask).tolist() == [2.0, 9.0, 14.0, 17.0]


def test_opt_leading_bos_with_pad_id_counts_as_real_text():
    # OPT starts every sequence with </s>, the same id as padding; the mask, not the id, decides.
    pad = 1
    ids = torch.tensor([[pad, 5, 6, 7, pad, pad]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert last_token_index(mask).item() == 3
    assert ids[0, last_token_index(mask)].item() == 7


def test_pairwise_loss_and_metrics_by_hand():
    chosen = torch.tensor([2.0, 0.5, -1.0])
    rejected = torch.tensor([1.0, 0.5, 1.0])
    expected = -(math.log(1 / (1 + math.exp(-1))) + math.log(0.5) + math.log(1 / (1 + math.exp(2)))) / 3
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    m = pair_metrics(chosen, rejected)
    assert m["accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert m["chosen_score"] == pytest.approx(0.5) and m["rejected_score"] == pytest.approx(2.5 / 3)
    assert m["margin"] == pytest.approx(0.5 - 2.5 / 3)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_score_ignores_padding_side_and_matches_hf_class_after_save(tmp_path, family):
    from transformers import AutoModelForSequenceClassification
    tok = load_tokenizer(f"tiny-{family}")
    model = load_reward_model(f"tiny-{family}", tok).eval()
    assert model.hf_model.score.weight.dtype == next(model.backbone.parameters()).dtype
    texts = [" Human: What is 2 + 3? Assistant: 5", " Human: Hi Assistant: hello there friend"]
    scores = {}
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            scores[side] = model.score(batch["input_ids"], batch["attention_mask"])
    single = torch.stack([model.score(**{k: v for k, v in tok(t, return_tensors="pt").items()
                                         if k in ("input_ids", "attention_mask")}).detach()[0]
                          for t in texts])
    torch.testing.assert_close(scores["right"], single, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores["left"], single, atol=1e-4, rtol=1e-4)

    model.hf_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_reward_model(str(tmp_path), load_tokenizer(str(tmp_path))).eval()
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tok.padding_side = "right"
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(again.score(batch["input_ids"], batch["attention_mask"]),
                                   scores["right"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(**batch).logits.squeeze(-1), scores["right"], atol=1e-4, rtol=1e-4)


def test_per_token_values_for_the_critic():
    tok = load_tokenizer("tiny-llama")
    model = load_reward_model("tiny-llama", tok)
    batch = tok(["a b c d"], return_tensors="pt")
    values = model(batch["input_ids"], batch["attention_mask"])
    assert values.shape == batch["input_ids"].shape
    values.sum().backward()
    assert model.hf_model.score.weight.grad is not None


def test_family_without_value_head_is_refused():
    tok = load_tokenizer("tiny-codegen")
    with pytest.raises(ConfigError, match="tiny-codegen"):
        load_reward_model("tiny-codegen", tok)


def test_divergence_loss_by_hand():
    from utils.model import divergence_loss
    c_ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 0, 0, 0]])
    r_ids = torch.tensor([[5, 6, 9, 0, 0], [5, 6, 0, 0, 0]])
    c_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    r_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    c_val = torch.tensor([[0.0, 0.0, 1.0, 2.0, 9.0], [0.0, 3.0, 9.0, 9.0, 9.0]])
    r_val = torch.tensor([[0.0, 0.0, 0.0, 1.0, 9.0], [0.0, 1.0, 9.0, 9.0, 9.0]])
    ls = lambda x: -math.log(1 / (1 + math.exp(-x)))
    # pair 1 diverges at position 2 and ends at 3 (the longer, chosen); pair 2 is identical:
    # scored at its last token (position 1)
    expected = ((ls(1.0) + ls(1.0)) / 2 + ls(2.0)) / 2
    got = divergence_loss(c_ids, r_ids, c_val, r_val, c_mask, r_mask)
    assert got.item() == pytest.approx(expected, rel=1e-6)
