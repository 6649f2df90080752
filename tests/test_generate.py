"""Greedy decoding with the KV cache: same tokens as transformers' generate() on the same weights,
and as recomputing the whole sequence without a cache."""

import pytest
import torch
from mixtral_reference import model_pair

NEW_TOKENS = 12


def prompts(vocab: int, left_pad: bool):
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, vocab, (2, 6), generator=g)
    attention_mask = torch.ones_like(input_ids)
    if left_pad:
        attention_mask[1, :2] = 0
        input_ids[1, :2] = 0
    return input_ids, attention_mask


def greedy(model, input_ids, attention_mask, use_cache=True):
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "overrides", [pytest.param({}, id="full"), pytest.param({"sliding_window": 4}, id="window4")]
)
@pytest.mark.parametrize("left_pad", [False, True], ids=["nopad", "leftpad"])
def test_greedy_generate_matches_reference_and_no_cache(tmp_path, attn, overrides, left_pad):
    ours, ref = model_pair(tmp_path, attn_implementation=attn, **overrides)
    input_ids, attention_mask = prompts(ours.config.vocab_size, left_pad)
    with torch.no_grad():
        cached = greedy(ours, input_ids, attention_mask)
        expected = greedy(ref, input_ids, attention_mask)
        recomputed = greedy(ours, input_ids, attention_mask, use_cache=False)
    assert cached.shape == (2, 6 + NEW_TOKENS)
    assert torch.equal(cached, expected)
    assert torch.equal(cached, recomputed)


def test_cached_step_logits_equal_full_forward(tmp_path):
    """Logits of one decoding step with the cache equal the last logits of a full forward."""
    ours, _ = model_pair(tmp_path, attn_implementation="sdpa", sliding_window=4)
    input_ids, attention_mask = prompts(ours.config.vocab_size, left_pad=True)
    next_token = torch.tensor([[5], [9]])
    with torch.no_grad():
        prefill = ours(input_ids, attention_mask=attention_mask, use_cache=True)
        step = ours(
            next_token,
            attention_mask=torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.long)], dim=1),
            cache=prefill.cache,
            use_cache=True,
        )
        full = ours(
            torch.cat([input_ids, next_token], dim=1),
            attention_mask=torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.long)], dim=1),
            use_cache=False,
        )
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
    assert step.past_key_values is step.cache


def test_generate_with_router_logits_requested_in_the_config(tmp_path):
    """Router losses during cached decoding use the mask columns of the tokens routed in that step."""
    ours, _ = model_pair(tmp_path, attn_implementation="sdpa", output_router_logits=True)
    input_ids, attention_mask = prompts(ours.config.vocab_size, left_pad=True)
    with torch.no_grad():
        with_router = greedy(ours, input_ids, attention_mask)
        ours.config.output_router_logits = False
        without = greedy(ours, input_ids, attention_mask)
    assert torch.equal(with_router, without)
