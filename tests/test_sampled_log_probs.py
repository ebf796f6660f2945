"""inference.generation: SampledLogProbs, the log-probs HF generate's sampled tokens had, equal to
a forward over the finished sequences (the Step 3 scoring forward), eos-stopped rows included;
GumbelSampler, Step 3 rollouts' draw from softmax(scores / T)."""
from __future__ import annotations

import pytest
import torch

from inference.generation import GumbelSampler, SampledLogProbs, generation_config, pad_to_width, sampling_processors
from training.step3_rlhf_finetuning.scoring import answer_log_probs
from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
from utils.rl_math import answer_mask


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.set_num_threads(1)
    path = resolve_model_path("tiny-llama")
    tok = load_tokenizer(path, padding_side="left")
    return load_causal_lm(path, tok).eval(), tok


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (1.3, 4)])
def test_recorded_log_probs_equal_a_forward_over_the_answers(model_and_tokenizer, temperature, top_k):
    model, tok = model_and_tokenizer
    batch = tok(["What is 2 + 3?", "Reverse the word cat, please."], return_tensors="pt", padding=True)
    ids, mask, new = batch["input_ids"], batch["attention_mask"], 10
    torch.manual_seed(0)
    # an eos the first row samples early, so rows stop at different steps and generate may end early
    eos = [tok.eos_token_id]
    recorder = SampledLogProbs(temperature)
    config = generation_config(max_new_tokens=new, do_sample=True, temperature=temperature, top_k=top_k,
                               top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             logits_processor=[recorder])
    kept = recorder.result(out, ids.shape[1], new)
    seq = pad_to_width(out, ids.shape[1] + new, tok.pad_token_id)
    answers = answer_mask(seq[:, ids.shape[1]:], eos, tok.pad_token_id)
    with torch.no_grad():
        scored = answer_log_probs(model, seq, torch.cat([mask, answers.long()], 1), ids.shape[1], temperature)
    assert kept.shape == (2, new) and kept.dtype == torch.float32
    assert torch.allclose(kept * answers, scored * answers, atol=1e-5)
    assert (kept[:, out.shape[1] - ids.shape[1]:] == 0).all()  # steps generate never ran
    assert (kept[answers] < 0).all()


def test_a_recorder_that_missed_steps_is_an_error():
    recorder = SampledLogProbs(1.0)
    with pytest.raises(RuntimeError, match="recorded 0 sampled log-probs for 3 generated tokens"):
        recorder.result(torch.zeros(1, 5, dtype=torch.long), 2, 4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_gumbel_sampler_draws_from_softmax_at_the_temperature(temperature):
    """Many rows of the same scores: each token's share of the draws is its probability under
    softmax(scores / T), a -inf token is never drawn, and generate gets one 0 score a row."""
    scores = torch.tensor([[2.0, 0.5, float("-inf"), -1.0, 1.0, 0.0]]).repeat(200_000, 1)
    torch.manual_seed(0)
    out = GumbelSampler(temperature)(None, scores)
    assert ((out == 0).sum(-1) == 1).all() and (out.isinf().sum(-1) == scores.shape[1] - 1).all()
    drawn = out.argmax(-1)
    share = torch.bincount(drawn, minlength=scores.shape[1]).double() / len(drawn)
    expected = torch.softmax(scores[0].double() / temperature, -1)
    sigma = (expected * (1 - expected) / len(drawn)).sqrt()
    assert share[2] == 0
    assert ((share - expected).abs() <= 5 * sigma + 1e-12).all(), (share, expected)
    torch.manual_seed(0)
    assert torch.equal(GumbelSampler(temperature)(None, scores).argmax(-1), drawn)  # the seed decides


def test_the_gumbel_sampler_is_used_only_without_truncation():
    assert GumbelSampler.untruncated(True, 0, 1.0)
    assert not GumbelSampler.untruncated(True, 4, 1.0) and not GumbelSampler.untruncated(True, 0, 0.9)
    assert not GumbelSampler.untruncated(False, 0, 1.0)


def test_the_gumbel_sampler_mostly_draws_the_same_tokens_from_a_slightly_different_model():
    """Same seed, scores off by ~1e-2 (another optimizer's rounding in bf16): the draws agree, as
    multinomial's do. An inverse-CDF draw agreed on 55% of such rows (32k tokens): its token
    boundaries sum every earlier token's error."""
    torch.manual_seed(1)
    scores = torch.randn(300, 32000) * 0.1  # a near-uniform policy, as a tiny random model's
    nudged = scores + torch.randn_like(scores) * 1e-2
    draws = []
    for s in (scores, nudged):
        torch.manual_seed(7)
        draws.append(GumbelSampler(1.0)(None, s).argmax(-1))
    assert (draws[0] == draws[1]).float().mean() > 0.95


def test_both_rollout_paths_get_the_gumbel_sampler_after_the_recorder():
    """sampling_processors, called by the hybrid engine and by the plain-generate rollout alike."""
    recorder = SampledLogProbs(0.7)
    untruncated = generation_config(max_new_tokens=4, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                                    pad_token_id=0, eos_token_id=2)
    config, processors = sampling_processors(untruncated, recorder)
    assert not config.do_sample and (config.max_new_tokens, config.pad_token_id, config.eos_token_id) == (4, 0, 2)
    assert processors[0] is recorder and isinstance(processors[1], GumbelSampler)
    assert processors[1].temperature == 0.7 and len(processors) == 2
    truncated = generation_config(max_new_tokens=4, do_sample=True, temperature=0.7, top_k=5, top_p=1.0,
                                  pad_token_id=0, eos_token_id=2)
    assert sampling_processors(truncated, recorder) == (truncated, [recorder])
    assert sampling_processors(truncated) == (truncated, None)
