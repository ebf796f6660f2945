"""Packed rows (utils/model/packing.py) and the forwards over them (utils/model/packed_forward.py):
the layout keeps every real token once, where the rows had it; packed log-probs, entropies,
critic values and their gradients equal the padded ones on the families that pack, under LoRA
too; a family that cannot pack (BLOOM, OPT) or whose check fails keeps the padded forwards."""
from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

from training.step3_rlhf_finetuning.scoring import answer_log_probs, critic_values
from utils.model import packed_forward
from utils.model.forward import position_ids_from_mask
from utils.model.packing import bin_width, first_fit_decreasing, pack, packed_shape

PACKING = ("llama", "qwen2", "gpt_neox", "gpt2")  # their decoders read packed sequences from position ids
PAD = 7


def ragged(rows: int, prompt: int, answer: int, seed: int, vocab: int = 1000):
    """Step 3's layout: left-padded prompts of 1..prompt tokens, right-padded answers of
    1..answer tokens (the widest fills its columns)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(10, vocab, (rows, prompt + answer), generator=g)
    prompts = torch.randint(1, prompt + 1, (rows,), generator=g)
    answers = torch.randint(1, answer + 1, (rows,), generator=g)
    answers[0] = answer
    cols = torch.arange(prompt + answer)
    mask = ((cols >= prompt - prompts[:, None]) & (cols < prompt + answers[:, None])).long()
    return seq.masked_fill(mask == 0, PAD), mask


# ------------------------------------------------------------------ the layout


def test_first_fit_decreasing_places_the_longest_first_into_the_first_bin_with_room():
    assert first_fit_decreasing([5, 3, 2, 4, 1], 5) == [(0, 0), (2, 0), (2, 3), (1, 0), (1, 4)]
    assert packed_shape([5, 3, 2, 4, 1]) == (3, 5)
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([6], 5)


def test_the_bin_width_trades_fuller_bins_against_longer_attention():
    lengths = [10, 16, 12, 19, 7]  # bins x width: 4 x 19 = 76 at the longest row, 3 x 23 = 69 at 1.25x
    assert bin_width(lengths, None) == 19
    assert bin_width(lengths, 0.0) == 23  # attention free: the fewest token slots
    assert bin_width(lengths, 1.0) == 19  # attention dear: 76 x 20 < 69 x 24
    assert bin_width([5, 5, 5], 0.0) == 5  # nothing to gain: the longest row, at most as many bins as rows


@pytest.mark.parametrize("seed", range(4))
def test_every_real_token_is_packed_once_at_its_position(seed):
    seq, mask = ragged(9, 12, 7, seed)
    packed = pack(seq, mask, 12, PAD)
    real = mask.bool()
    width = int(mask.sum(1).max())
    assert packed.input_ids.shape == (packed_shape(mask.sum(1).tolist())[0], width)
    assert packed.input_ids.size(0) <= seq.size(0)
    assert packed.tokens.unique().numel() == packed.tokens.numel() == int(mask.sum())  # each once
    flat_ids, flat_pos = packed.input_ids.flatten(), packed.position_ids.flatten()
    assert torch.equal(flat_ids[packed.tokens], seq[real])  # round trip, in the rows' order
    assert torch.equal(flat_pos[packed.tokens], position_ids_from_mask(mask)[real])
    rest = torch.ones_like(flat_ids, dtype=torch.bool).index_fill(0, packed.tokens, False)
    assert (flat_ids[rest] == PAD).all()


@pytest.mark.parametrize("seed", range(4))
def test_the_answer_maps_point_at_each_answer_token_and_its_predictor(seed):
    seq, mask = ragged(9, 12, 7, seed)
    packed = pack(seq, mask, 12, PAD)
    answers = seq[:, 12:]
    assert packed.target.numel() == int(mask[:, 12:].sum())
    ids, pos = packed.input_ids.flatten(), packed.position_ids.flatten()
    assert torch.equal(ids[packed.source + 1], answers.flatten()[packed.target])  # the next token is the answer's
    assert torch.equal(pos[packed.source] + 1, pos[packed.source + 1])  # in the same sequence
    values = torch.arange(1, packed.target.numel() + 1, dtype=torch.float)
    rows = packed.unpack(values)
    assert rows.shape == answers.shape and torch.equal(rows[mask[:, 12:].bool()], values)
    assert (rows[mask[:, 12:] == 0] == 0).all()


def test_transformers_reads_one_sequence_per_row_and_one_per_tail():
    seq, mask = ragged(9, 12, 7, 0)
    packed = pack(seq, mask, 12, PAD)
    segments = find_packed_sequence_indices(packed.position_ids)
    width, flat = packed.width, segments.flatten()
    lengths = mask.sum(1)
    start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    for row in range(seq.size(0)):  # a row's tokens: one segment, no other row's, no tail
        mine = packed.tokens[start[row]:start[row] + lengths[row]]
        others = torch.cat([packed.tokens[:start[row]], packed.tokens[start[row] + lengths[row]:]])
        bin_ = mine[0] // width
        assert flat[mine].unique().numel() == 1
        same_bin = torch.arange(bin_ * width, (bin_ + 1) * width)
        outside = same_bin[~torch.isin(same_bin, mine)]
        assert not torch.isin(flat[outside], flat[mine]).any()
        assert not torch.isin(others, mine).any()


def test_packing_is_deterministic_and_an_answer_without_a_prompt_is_refused():
    seq, mask = ragged(9, 12, 7, 1)
    a, b = pack(seq, mask, 12, PAD), pack(seq.clone(), mask.clone(), 12, PAD)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "position_ids", "source", "target"))
    mask[2, :12] = 0
    with pytest.raises(ValueError, match="no prompt token predicts it"):
        pack(seq, mask, 12, PAD)


# ------------------------------------------------------------------ forwards


@pytest.fixture(scope="module")
def models():
    """family -> a tiny random causal LM, loaded once."""
    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
    torch.set_num_threads(1)
    cache = {}

    def get(family: str):
        if family not in cache:
            path = resolve_model_path(f"tiny-{family}")
            cache[family] = load_causal_lm(path, load_tokenizer(path)).eval()
        return cache[family]
    return get


def both_ways(model, seq, mask, prompt_len: int = 12, temperature: float = 0.7):
    """(padded, packed) log-probs and entropies."""
    with torch.no_grad():
        return (answer_log_probs(model, seq, mask, prompt_len, temperature, with_entropy=True),
                answer_log_probs(model, seq, mask, prompt_len, temperature, with_entropy=True, pack=True))


def assert_same_on_answers(a, b, mask, atol=1e-5):
    answers = mask[:, 12:].bool()
    assert torch.allclose(a[answers], b[answers], atol=atol)
    assert (b[~answers] == 0).all()


@pytest.mark.parametrize("family", PACKING)
def test_packed_log_probs_and_entropy_equal_the_padded(models, family):
    model = models(family)
    seq, mask = ragged(8, 12, 7, 3)
    (want, want_entropy), (got, got_entropy) = both_ways(model, seq, mask)
    assert packed_forward.decision(model) is True
    assert packed_forward.pack_for(model, seq, mask, 12).input_ids.size(0) < len(seq)  # rows share bins
    assert_same_on_answers(want, got, mask)
    assert_same_on_answers(want_entropy, got_entropy, mask)


def loss_grads(model, seq, mask, pack: bool) -> dict:
    """Gradients of a PPO-like loss (advantage-weighted log-probs and entropy) over the answers."""
    model.zero_grad()
    log_probs, entropy = answer_log_probs(model, seq, mask, 12, 0.7, with_entropy=True, pack=pack)
    weights = torch.linspace(-1, 1, log_probs.numel()).view_as(log_probs) * mask[:, 12:]
    (log_probs * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(model, seq, mask):
    padded, packed = loss_grads(model, seq, mask, False), loss_grads(model, seq, mask, True)
    assert padded.keys() == packed.keys() and padded
    for name in padded:  # fp32 sums in another order: relative to the gradient's norm
        assert (padded[name] - packed[name]).norm() <= 1e-5 * padded[name].norm() + 1e-8, name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_gradients_equal_the_padded(models, family):
    assert_same_grads(models(family), *ragged(6, 12, 7, 4))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_under_lora(family):
    from utils.model import apply_lora, load_causal_lm, load_tokenizer, resolve_model_path
    path = resolve_model_path(f"tiny-{family}")
    torch.manual_seed(0)
    model = apply_lora(load_causal_lm(path, load_tokenizer(path)), 4, only_optimize_lora=True).eval()
    for name, p in model.named_parameters():  # B starts at 0: move it so the adapters change the outputs
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    seq, mask = ragged(6, 12, 7, 5)
    (want, _), (got, _) = both_ways(model, seq, mask)
    assert packed_forward.decision(model) is True
    assert_same_on_answers(want, got, mask)
    assert_same_grads(model, seq, mask)


def test_packed_critic_values_and_gradients_equal_the_padded():
    from utils.model import load_reward_model, load_tokenizer, resolve_model_path
    path = resolve_model_path("tiny-llama")
    torch.manual_seed(0)
    critic = load_reward_model(path, load_tokenizer(path)).eval()
    seq, mask = ragged(6, 12, 7, 6)
    answers = mask[:, 12:].bool()
    grads = []
    for packed in (False, True):
        critic.zero_grad()
        values = critic_values(critic, seq, mask, 12, packed)
        (values * answers).sum().backward()
        grads.append((values.detach(), {n: p.grad.clone() for n, p in critic.named_parameters()}))
    assert packed_forward.decision(critic) is True
    assert torch.allclose(grads[0][0][answers], grads[1][0][answers], atol=1e-5)
    for name, grad in grads[0][1].items():
        assert (grad - grads[1][1][name]).norm() <= 1e-5 * grad.norm() + 1e-8, name


# ------------------------------------------------------------------ who packs


@pytest.mark.parametrize("family,reason", [
    ("bloom", "takes no position ids"),
    # transformers 5's OPT decoder builds its mask without the position ids: a bin's sequences see each other
    ("opt", "packed and padded outputs differ"),
])
def test_a_family_that_cannot_pack_keeps_the_padded_forwards(models, family, reason, capsys):
    model = models(family)
    seq, mask = ragged(8, 12, 7, 7)
    (want, _), (got, _) = both_ways(model, seq, mask)
    assert packed_forward.decision(model) is False
    assert reason in capsys.readouterr().out
    assert torch.equal(want, got)  # the padded forward, both times


@pytest.mark.parametrize("family,packs", [("llama", True), ("opt", False)])
def test_in_bf16_a_leak_between_sequences_is_seen_under_the_rounding(family, packs, capsys):
    """bf16 rounds packed and padded forwards apart by as much as a tiny model's leak: the
    check sees the leak by changing the first sequence of the bin instead."""
    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
    path = resolve_model_path(f"tiny-{family}")
    model = load_causal_lm(path, load_tokenizer(path)).to(torch.bfloat16).eval()
    seq, mask = ragged(8, 12, 7, 9)
    (want, _), (got, _) = both_ways(model, seq, mask)
    assert packed_forward.decision(model) is packs
    if packs:
        assert_same_on_answers(want, got, mask, atol=0.1)
    else:
        assert "outputs follow the one before it" in capsys.readouterr().out


@pytest.mark.parametrize("broken,reason", [("off", "differ by up to"), ("raises", "raised ZeroDivisionError")])
def test_a_failed_check_falls_back_once_and_for_the_run(monkeypatch, capsys, broken, reason):
    import training.step3_rlhf_finetuning.scoring as scoring
    from utils.model import load_causal_lm, load_tokenizer, resolve_model_path
    path = resolve_model_path("tiny-qwen2")
    model = load_causal_lm(path, load_tokenizer(path)).eval()
    real = scoring.packed_logits
    monkeypatch.setattr(scoring, "packed_logits", {"off": lambda m, p: real(m, p).roll(1, -1),
                                                   "raises": lambda m, p: 1 / 0}[broken])
    checks, why_not = [], packed_forward._why_not
    monkeypatch.setattr(packed_forward, "_why_not", lambda *a: checks.append(1) or why_not(*a))
    seq, mask = ragged(8, 12, 7, 8)
    (want, _), (got, _) = both_ways(model, seq, mask)
    both_ways(model, seq, mask)
    assert packed_forward.decision(model) is False and len(checks) == 1 and torch.equal(want, got)
    out = capsys.readouterr().out
    assert out.count("padded forwards") == 1 and reason in out and "qwen2" in out
