"""Policies that propose action strings for prompts: the language model, and a random baseline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from typing import Any

from dpo_driver.constrained import AnswerConstraint, AnswerSpace, Vocab
from dpo_driver.environment import Environment


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off; a small top-k keeps samples near the policy's mode
    top_p: float = 1.0
    max_new_tokens: int = 24  # one action line is < 20 tokens
    batch_size: int = 16  # prompts per generate() call
    # "sample": K i.i.d. samples per prompt. "verbs": the K samples split evenly over the answer
    # starts the state allows (Environment.prefixes: MiniWoB's verbs), each sample starting with its
    # prefix (see LMPolicy._propose_per_verb). "candidates": the "verbs" samples plus every action
    # the state offers (Environment.candidates).
    strategy: str = "sample"
    # Mask every token that would leave the answers the state accepts (Environment.answer_space;
    # dpo_driver.constrained): answers are always well-formed actions, the choice stays the policy's.
    # On by default: free decoding's malformed answers were most of what DPO cost off its suite
    # (benchmarks/results/retention_*_constrained.json), and the whole loop keeps its gain held
    # (learning_default_constrained.json). Families without an answer space decode freely anyway.
    constrained: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"sampling strategy must be one of {STRATEGIES}, got {self.strategy!r}")

    @property
    def explores(self) -> bool:
        """Distinct proposals are played out greedily and successes branched (rollouts._branch_successes)."""
        return self.strategy in ("verbs", "candidates")


STRATEGIES = ("sample", "verbs", "candidates")


@dataclass
class GenerationStats:
    calls: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the previous call's cache (LMPolicy.reuse_prefix)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@dataclass
class LMPolicy:
    """A causal LM (optionally with a LoRA adapter) answering one action per prompt.

    `env` (the family) serves exploring strategies: the answer starts to force and the candidate
    actions of a state. Without it those strategies fall back to plain sampling."""

    model: object
    tokenizer: object
    env: Environment | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    _vocab: Vocab | None = field(default=None, repr=False)  # built on the first constrained call
    # One prompt at a time (the one-browser loop's later steps), the next step's prompt repeats the
    # last one up to its history ("Done so far: ..."), so the last call's KV cache is kept and only
    # the tokens after the shared prefix are prefilled (prefill is most of a ~250-token step).
    reuse_prefix: bool = True
    _last: tuple | None = field(default=None, repr=False)  # (token ids the cache covers, DynamicCache)

    def propose(self, prompts: list[str], observations: list[Any], num_samples: int, sampling: Sampling, seed: int) -> list[list[str]]:
        if sampling.explores and sampling.temperature > 0 and num_samples > 1:
            outs = self._propose_per_verb(prompts, observations, num_samples, sampling, seed)
            if sampling.strategy == "candidates":
                outs = [o + (self.env.candidates(obs) if self.env else []) for o, obs in zip(outs, observations)]
            return outs
        greedy = sampling.temperature <= 0
        outs: list[list[str]] = []
        for i in range(0, len(prompts), sampling.batch_size):
            chunk = [self._chat(p) for p in prompts[i : i + sampling.batch_size]]
            per = 1 if greedy else num_samples
            spaces = self._spaces(observations[i : i + sampling.batch_size], sampling)
            decoded = [self._answer(t) for t in self._generate(chunk, per, sampling, seed + i, spaces)]
            for j in range(len(chunk)):
                answers = decoded[j * per : (j + 1) * per]
                outs.append(answers * num_samples if greedy else answers)
        return outs

    def _propose_per_verb(self, prompts: list[str], observations: list[Any], k: int, sampling: Sampling, seed: int) -> list[list[str]]:
        """K // (verbs the page allows) samples per verb, the verb forced as the answer's first word.

        Plain sampling finds a rare right verb only by luck (typing before Submit on enter-text:
        ~3% of samples from the SFT policy, 1 success in 240 episodes), and beam search spends
        its slots on spellings of the mode ("Click button ...", "button ..."). Forcing each verb
        of the grammar puts it in front of the environment on every state; the rest of the
        answer (kind, text) is sampled from the policy.
        """
        outs: list[list[str]] = [[] for _ in prompts]
        groups: dict[int, list[tuple[int, str]]] = {}  # samples per verb -> (prompt index, verb)
        for j, obs in enumerate(observations):
            verbs = (self.env.prefixes(obs) if self.env else ()) or ("",)
            groups.setdefault(max(1, k // len(verbs)), []).extend((j, verb) for verb in verbs)
        for per, group in sorted(groups.items()):
            for i in range(0, len(group), sampling.batch_size):
                chunk = group[i : i + sampling.batch_size]
                spaces = self._spaces([observations[j] for j, _ in chunk], sampling)
                decoded = self._generate([self._chat(prompts[j]) + verb for j, verb in chunk], per, sampling, seed + i,
                                         spaces, [verb for _, verb in chunk])
                for n, (j, verb) in enumerate(chunk):
                    outs[j] += [self._answer(verb + d) for d in decoded[n * per : (n + 1) * per]]
        return outs

    def _answer(self, text: str) -> str:
        """The answer in a continuation: its first line, or all of it for families whose answers span
        lines (Environment.multiline_answers: tool use's "Thought: ... / Action: {...}")."""
        if self.env is not None and self.env.multiline_answers:
            return text.strip()
        return first_line(text)

    def _chat(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def _spaces(self, observations: list[Any], sampling: Sampling) -> list[AnswerSpace | None] | None:
        if not (sampling.constrained and self.env is not None):
            return None
        return [self.env.answer_space(obs) for obs in observations]

    def _generate(self, texts: list[str], per: int, sampling: Sampling, seed: int,
                  spaces: list[AnswerSpace | None] | None = None, heads: list[str] | None = None) -> list[str]:
        """`per` raw continuations of each text, in text order; held to `spaces` (one per text, the
        answer's start `heads`) when given."""
        import torch
        from transformers import LogitsProcessorList

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if sampling.temperature <= 0:
            kwargs.update(do_sample=False, num_return_sequences=1)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None,
                          top_p=sampling.top_p, num_return_sequences=per)
        if spaces is not None and any(sp is not None for sp in spaces):
            kwargs["logits_processor"] = LogitsProcessorList([self._constraint(spaces, heads or [""] * len(texts), kwargs["num_return_sequences"])])
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            if kwargs["do_sample"] and per > 1:
                gen = self._sample_shared_prefill(enc, per, kwargs)
            elif self.reuse_prefix and len(texts) == 1:
                gen = self._generate_reusing_prefix(enc, kwargs)
            else:
                gen = self.model.generate(**enc, **kwargs)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        new = gen[:, enc["input_ids"].shape[1] :]
        self.stats.prompt_tokens += int(enc["attention_mask"].sum())
        self.stats.new_tokens += int((new != self.tokenizer.pad_token_id).sum())
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _constraint(self, spaces: list[AnswerSpace | None], heads: list[str], per: int) -> AnswerConstraint:
        if self._vocab is None:
            size = max(len(self.tokenizer), self.model.config.vocab_size)
            self._vocab = Vocab(self.tokenizer, size)
        eos = self.model.generation_config.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos if eos is not None else self.tokenizer.eos_token_id,)
        return AnswerConstraint(self._vocab, spaces, heads, per, eos)

    def _generate_reusing_prefix(self, enc, kwargs: dict):
        """generate() for one prompt on the last call's KV cache, cropped to the tokens the two
        sequences share: the same computation as a plain generate (keys and values of a position
        depend only on the tokens before it), minus the shared prefill."""
        from transformers import DynamicCache

        ids, cache, shared = enc["input_ids"][0], None, 0
        if self._last is not None:
            last_ids, cache = self._last
            n = min(len(last_ids), len(ids) - 1, cache.get_seq_length())  # at least one new token is fed
            differs = (last_ids[:n] != ids[:n]).nonzero()
            shared = int(differs[0, 0]) if len(differs) else n
            cache.crop(shared - cache.get_seq_length())  # transformers 5: minus the tokens to drop
        cache = cache if shared else DynamicCache()
        self._last = None  # generate() extends the cache in place: a failed call leaves nothing to reuse
        gen = self.model.generate(**enc, **kwargs, past_key_values=cache)
        self._last = (gen[0], cache)
        self.stats.reused_tokens += shared
        return gen

    def _sample_shared_prefill(self, enc, k: int, kwargs: dict):
        """K samples per prompt from one prefill: the prompt's KV cache is computed once and
        repeated K times, so only the decode steps are paid per sample (prefill is most of the
        cost for ~80-token prompts and ~10-token answers)."""
        ids, mask = enc["input_ids"], enc["attention_mask"]
        # Left padding: positions must count real tokens only, exactly as generate() does.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Only the cache is used: one position's logits, not every prompt token's over the vocabulary.
        out = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
                         logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)
        kwargs = {**kwargs, "num_return_sequences": 1}
        # generate() sees the cached prefix and feeds only the last prompt token.
        return self.model.generate(input_ids=ids.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0),
                                   past_key_values=cache, **kwargs)


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


@dataclass
class RandomPolicy:
    """A uniformly random action among those the state offers (Environment.candidates): the chance baseline."""

    env: Environment
    stats: GenerationStats = field(default_factory=GenerationStats)

    def propose(self, prompts, observations: list[Any], num_samples: int, sampling: Sampling, seed: int) -> list[list[str]]:
        rng = random.Random(seed)
        outs = []
        for obs in observations:
            actions = self.env.candidates(obs)
            outs.append([rng.choice(actions) if actions else "" for _ in range(num_samples)])
        return outs
