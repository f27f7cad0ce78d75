"""Policies that propose action strings for prompts: the language model, and a random baseline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from dpo_driver.observation import Observation


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off; a small top-k keeps samples near the policy's mode
    top_p: float = 1.0
    max_new_tokens: int = 24  # one action line is < 20 tokens
    batch_size: int = 16  # prompts per generate() call


@dataclass
class GenerationStats:
    calls: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@dataclass
class LMPolicy:
    """A causal LM (optionally with a LoRA adapter) answering one action line per prompt."""

    model: object
    tokenizer: object
    stats: GenerationStats = field(default_factory=GenerationStats)

    def propose(self, prompts: list[str], observations: list[Observation], num_samples: int, sampling: Sampling, seed: int) -> list[list[str]]:
        import torch

        outs: list[list[str]] = []
        for i in range(0, len(prompts), sampling.batch_size):
            chunk = prompts[i : i + sampling.batch_size]
            texts = [
                self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in chunk
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            greedy = sampling.temperature <= 0
            kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
            if greedy:
                kwargs.update(do_sample=False, num_return_sequences=1)
            else:
                kwargs.update(
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_k=sampling.top_k or None,
                    top_p=sampling.top_p,
                    num_return_sequences=num_samples,
                )
            torch.manual_seed(seed + i)
            t0 = time.perf_counter()
            with torch.no_grad():
                if greedy or num_samples == 1:
                    gen = self.model.generate(**enc, **kwargs)
                else:
                    gen = self._sample_shared_prefill(enc, num_samples, kwargs)
            self.stats.seconds += time.perf_counter() - t0
            self.stats.calls += 1
            new = gen[:, enc["input_ids"].shape[1] :]
            self.stats.prompt_tokens += int(enc["attention_mask"].sum())
            self.stats.new_tokens += int((new != self.tokenizer.pad_token_id).sum())
            decoded = [first_line(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
            per = 1 if greedy else num_samples
            for j in range(len(chunk)):
                answers = decoded[j * per : (j + 1) * per]
                outs.append(answers * num_samples if greedy else answers)
        return outs

    def _sample_shared_prefill(self, enc, k: int, kwargs: dict):
        """K samples per prompt from one prefill: the prompt's KV cache is computed once and
        repeated K times, so only the decode steps are paid per sample (prefill is most of the
        cost for ~80-token prompts and ~10-token answers)."""
        ids, mask = enc["input_ids"], enc["attention_mask"]
        # Left padding: positions must count real tokens only, exactly as generate() does.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True)
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
    """Clicks (or types into) a uniformly random listed element: the chance baseline."""

    stats: GenerationStats = field(default_factory=GenerationStats)

    def propose(self, prompts, observations: list[Observation], num_samples: int, sampling: Sampling, seed: int) -> list[list[str]]:
        rng = random.Random(seed)
        outs = []
        for obs in observations:
            answers = []
            for _ in range(num_samples):
                if not obs.elements:
                    answers.append("")
                    continue
                e = rng.choice(obs.elements)
                if e.kind in ("textbox", "textarea"):
                    quoted = obs.utterance.split('"')[1::2]
                    answers.append(f'type {e.kind} "{quoted[0] if quoted else "text"}"')
                else:
                    answers.append(f'click {e.kind} "{e.text}"')
            outs.append(answers)
        return outs
