import pytest
import torch

from dpo_driver.observation import Element, Observation, render_prompt
from dpo_driver.policy import RandomPolicy, Sampling

OBS = [Observation(f'Click on the "{n}" button.', (Element(1, "button", n), Element(2, "button", "Cancel"))) for n in ("ok", "yes", "Submit")]
PROMPTS = [render_prompt(o) for o in OBS]


def test_shared_prefill_decodes_exactly_like_plain_generate(policy):
    """The cached-prefix path must be the same computation: greedy outputs agree token for token."""
    tok = policy.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any(), "prompts of different lengths exercise left padding"
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        plain = policy.model.generate(**enc, **kw)
        shared = policy._sample_shared_prefill(enc, 2, kw)
    assert torch.equal(shared[::2], plain) and torch.equal(shared[1::2], plain)


def test_sampling_gives_k_answers_per_prompt_and_is_seeded(policy):
    s = Sampling(temperature=1.0, top_k=50, max_new_tokens=6, batch_size=2)
    a = policy.propose(PROMPTS, OBS, 4, s, seed=3)
    b = policy.propose(PROMPTS, OBS, 4, s, seed=3)
    assert [len(x) for x in a] == [4, 4, 4] and a == b
    assert policy.stats.calls == 4 and policy.stats.new_tokens > 0


def test_random_policy_proposes_valid_actions(miniwob):
    from dpo_driver.actions import parse_action

    outs = RandomPolicy(miniwob).propose(PROMPTS, OBS, 5, Sampling(), seed=0)
    assert all(parse_action(a) for answers in outs for a in answers)


def test_verbs_strategy_splits_samples_over_the_verbs_the_page_allows(policy):
    form = Observation('Enter "Bob" into the text field and press Submit.', (Element(1, "textbox", ""), Element(2, "button", "Submit")))
    s = Sampling(temperature=1.0, top_k=50, max_new_tokens=6, batch_size=4, strategy="verbs")
    buttons_only, with_field = policy.propose([PROMPTS[0], render_prompt(form)], [OBS[0], form], 4, s, seed=1)
    assert len(buttons_only) == 4 and all(a.startswith("click") for a in buttons_only)  # no text field: no `type`
    assert [a.startswith("click") for a in with_field] == [True, True, False, False]
    assert all(a.startswith("type") for a in with_field[2:])  # the random model's continuation follows the forced verb
    assert policy.propose([render_prompt(form)], [form], 4, s, seed=1) == [with_field]  # seeded
    with pytest.raises(ValueError, match="strategy"):
        Sampling(strategy="beam")


def test_prefix_reuse_decodes_exactly_like_plain_generate(policy):
    """One prompt at a time, a step's prompt extends the last one (the history grows); the cached
    prefix must be the same computation: greedy answers agree, and the shared tokens were reused."""
    from dataclasses import replace

    history = PROMPTS[0] + '\nDone so far:\n- click button "ok"'
    steps = [PROMPTS[0], history, history + '\n- click button "Cancel"', PROMPTS[1], PROMPTS[1]]  # then another page, twice
    s = Sampling(temperature=0.0, max_new_tokens=8, constrained=False)
    plain = replace(policy, reuse_prefix=False, stats=type(policy.stats)())
    reusing = replace(policy, reuse_prefix=True, stats=type(policy.stats)(), _last=None)
    for p, o in zip(steps, [OBS[0]] * 3 + [OBS[1]] * 2):
        assert reusing.propose([p], [o], 1, s, seed=0) == plain.propose([p], [o], 1, s, seed=0)
    assert plain.stats.reused_tokens == 0
    # Every later call shares at least the chat header; the history steps share the whole last prompt.
    assert reusing.stats.reused_tokens > 2 * len(policy.tokenizer(policy._chat(PROMPTS[0])).input_ids)
