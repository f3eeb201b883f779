"""The invariants of transformers' `GenerationTesterMixin` (tests/generation/test_utils.py, which the sdist does not
ship) on `LaVITForCausalLM`, with an image prompt: greedy decoding is the argmax of the forward pass, the cache does
not change the result, dict outputs have the per-step shapes the mixin checks, seeded sampling repeats, beam search
returns `num_return_sequences` rows."""

import pytest
import torch
from test_transformers_modeling import LaVITModelTester

from lavit import LaVITForCausalLM

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def model_and_inputs():
    config, inputs = LaVITModelTester(None, batch_size=2).prepare_config_and_inputs_for_common()
    torch.manual_seed(0)
    return LaVITForCausalLM(config).eval(), inputs


@torch.no_grad()
def test_greedy_is_the_argmax_of_the_forward_pass(model_and_inputs):
    model, inputs = model_and_inputs
    sequences = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert sequences.shape == (2, prompt_length + NEW_TOKENS)
    assert torch.equal(sequences[:, :prompt_length], inputs["input_ids"])  # the given ids come back first
    for step in range(NEW_TOKENS):  # each new token is the argmax after the prompt and the tokens before it
        context = {**inputs, "input_ids": sequences[:, : prompt_length + step],
                   "attention_mask": torch.ones(2, prompt_length + step, dtype=torch.long)}
        logits = model(**context).logits[:, -1]
        logits[:, model.config.text_vocab_size: model.config.visual_token_end] = -torch.inf  # image ids suppressed
        assert torch.equal(logits.argmax(-1), sequences[:, prompt_length + step])


@torch.no_grad()
def test_the_cache_does_not_change_greedy_decoding(model_and_inputs):
    model, inputs = model_and_inputs
    cached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_dict_outputs_have_one_entry_per_step(model_and_inputs):
    model, inputs = model_and_inputs
    model.set_attn_implementation("eager")  # attention maps come from eager attention (as the mixin sets it)
    try:
        outputs = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 return_dict_in_generate=True, output_scores=True, output_logits=True,
                                 output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    config = model.config.text_config
    assert len(outputs.scores) == len(outputs.logits) == NEW_TOKENS
    assert all(score.shape == (2, model.config.vocab_size) for score in outputs.scores)
    assert len(outputs.hidden_states) == len(outputs.attentions) == NEW_TOKENS
    # the first step reads the expanded prompt (text + each image's kept tokens), every later step one token
    expanded_length = inputs["input_ids"].shape[1] + int(inputs["image_keep_mask"][0].sum())
    for step, (hidden_states, attentions) in enumerate(zip(outputs.hidden_states, outputs.attentions, strict=True)):
        length = expanded_length if step == 0 else 1
        assert len(hidden_states) == config.num_hidden_layers + 1
        assert all(state.shape == (2, length, config.hidden_size) for state in hidden_states)
        assert len(attentions) == config.num_hidden_layers
        assert all(attention.shape == (2, config.num_attention_heads, length, expanded_length + step)
                   for attention in attentions)
    assert torch.equal(outputs.sequences, model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False))


@torch.no_grad()
def test_seeded_sampling_repeats_and_beam_search_returns_every_sequence(model_and_inputs):
    model, inputs = model_and_inputs
    first = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True,
                           generator=torch.Generator().manual_seed(3))
    again = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True,
                           generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    beams = model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 4
    assert torch.equal(beams[::2, : inputs["input_ids"].shape[1]], inputs["input_ids"])
