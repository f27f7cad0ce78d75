"""Decoding held to the answers a state accepts.

Most of what DPO costs a 135M policy off its training suite is the answer's form, not its choice
(`click button ONE`, a kind the page does not list: benchmarks/results/retention_default_suite.json).
When the environment knows which answers a state accepts (Environment.answer_space), the decoder
masks every token that would leave that set, so each greedy or sampled answer is an action the state
accepts; which one is still the policy's choice, and free text (what `type` types) stays free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where masks are built: families import this module for its types
    import torch


@dataclass(frozen=True)
class Slot:
    """Answers `prefix` + free text (none of `banned`; starting with a non-space when `nonblank`) +
    `close` + one of `suffixes`."""

    prefix: str
    close: str = '"'
    banned: str = '"\n'
    suffixes: tuple[str, ...] = ("",)
    nonblank: bool = False

    def __post_init__(self):
        if len(self.close) != 1 or self.close not in self.banned:
            raise ValueError(f"a slot's close must be one character that its free text may not hold: {self!r}")


@dataclass(frozen=True)
class AnswerSpace:
    """The whole answers a state accepts: fixed strings, and slots of free text."""

    fixed: tuple[str, ...] = ()
    slots: tuple[Slot, ...] = ()

    def accepts(self, answer: str) -> bool:
        if answer in self.fixed:
            return True
        for s in self.slots:
            if answer.startswith(s.prefix):
                text, sep, after = answer[len(s.prefix):].partition(s.close)
                blank = not text or text[0].isspace()
                if sep and not any(c in text for c in s.banned) and after in s.suffixes and not (s.nonblank and blank):
                    return True
        return False


class Vocab:
    """A tokenizer's tokens as bytes, indexed for the masks (built once per policy: ~1 s for 49k tokens).

    Bytes, not text: a byte-level BPE spells a label such as "确定" in fragments of characters, so
    matching decoded text would leave such labels unreachable."""

    def __init__(self, tokenizer, size: int):
        self.size = size
        n = min(size, len(tokenizer))
        special = set(tokenizer.all_special_ids)
        spell = _byte_speller(tokenizer)
        self.bytes = [b"" if i in special else spell(tok) for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(n))))]
        self.bytes += [b""] * (size - n)
        self.by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.bytes):
            if b:
                self.by_bytes.setdefault(b, []).append(i)
        self.longest = max(map(len, self.by_bytes))
        self._masks: dict[tuple, torch.Tensor] = {}

    def spell(self, ids: list[int]) -> bytes:
        return b"".join(self.bytes[i] for i in ids)

    def prefixes_of(self, rest: bytes) -> list[int]:
        """Tokens whose bytes start `rest`."""
        return [i for k in range(1, min(len(rest), self.longest) + 1) for i in self.by_bytes.get(rest[:k], ())]

    def crossing(self, rest: bytes, banned: bytes, nonblank: bool) -> torch.Tensor:
        """Mask of the tokens that spell `rest` (the end of a slot's prefix) and go on into its free
        text: "Thought: I" is "Thought", ":", " I" to a BPE, so a prefix ending in a space is only ever
        left through such a token (with `rest` alone the policy is pushed off its own spelling)."""
        return self._mask(("crossing", rest, banned, nonblank), lambda b: (
            len(b) > len(rest) and b.startswith(rest) and not any(c in b[len(rest):] for c in banned)
            and not (nonblank and b[len(rest):len(rest) + 1].isspace())))

    def free(self, banned: bytes, close: bytes, first: bool = False) -> torch.Tensor:
        """Mask of the tokens free text may take next: no banned byte, or free text then `close`;
        `first`: the text's first token, which must start with a non-space."""
        return self._mask(("free", banned, close, first), lambda b: (
            bool(b) and (not any(c in b for c in banned) or (b.endswith(close) and not any(c in b[:-1] for c in banned)))
            and not (first and (b[:1].isspace() or b[:1] == close))))

    def _mask(self, key: tuple, accepts) -> torch.Tensor:
        """The boolean mask of the tokens whose bytes `accepts`, built by one scan and kept per key."""
        import torch

        if key not in self._masks:
            self._masks[key] = torch.tensor([accepts(b) for b in self.bytes], dtype=torch.bool)
        return self._masks[key]


def _byte_speller(tokenizer):
    """token string -> its bytes: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) maps each byte to one
    printable character; SentencePiece writes spaces as "▁" and raw bytes as <0xNN>."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":
        # GPT-2's table: printable bytes stand for themselves, the rest for chr(256 + k) in byte order.
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
        others = [b for b in range(256) if b not in printable]
        back = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
        return lambda tok: bytes(back[c] for c in tok) if all(c in back for c in tok) else b""

    def sentencepiece(tok: str) -> bytes:
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            return bytes([int(tok[3:5], 16)])
        return tok.replace("▁", " ").encode()

    return sentencepiece


@dataclass
class AnswerConstraint:
    """A logits processor keeping every row's continuation inside its prompt's answer space.

    Row r of the batch answers prompt r // per (generate expands each prompt `per` times, in order);
    `heads[p]` is the part of prompt p's answer already in its prompt (a forced verb). Rows whose
    space is None are left free. A row that can reach no accepted answer (a label the tokenizer
    cannot spell) may only end, and its answer is then judged malformed as any other.
    """

    vocab: Vocab
    spaces: list[AnswerSpace | None]
    heads: list[str]
    per: int
    eos: tuple[int, ...]
    start: int | None = None
    _cache: dict = field(default_factory=dict)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]  # the (left-padded) prompts' length at the first step
        for r in range(input_ids.shape[0]):
            p = r // self.per
            space = self.spaces[p]
            gen = input_ids[r, self.start:].tolist()
            if space is None or any(t in self.eos for t in gen):
                continue  # free row, or a finished one (generate pads it)
            allowed = self._allowed(p, space, self.heads[p].encode() + self.vocab.spell(gen))
            scores[r, ~allowed[: scores.shape[1]]] = -float("inf")
        return scores

    def _allowed(self, p: int, space: AnswerSpace, text: bytes) -> torch.Tensor:
        """Mask of the tokens that keep `text` (the answer so far) on the way to an accepted answer."""
        import torch

        key = (p, text)
        if key not in self._cache:
            ids: list[int] = []
            masks: list[torch.Tensor] = []
            done = False
            for answer in (a.encode() for a in space.fixed):
                if answer.startswith(text):
                    done |= answer == text
                    ids += self.vocab.prefixes_of(answer[len(text):])
            for s in space.slots:
                prefix, close = s.prefix.encode(), s.close.encode()
                if len(text) < len(prefix):
                    if prefix.startswith(text):
                        ids += self.vocab.prefixes_of(prefix[len(text):])
                        masks.append(self.vocab.crossing(prefix[len(text):], s.banned.encode(), s.nonblank))
                    continue
                if not text.startswith(prefix):
                    continue
                typed, closed, after = text[len(prefix):].partition(close)
                if not closed:
                    masks.append(self.vocab.free(s.banned.encode(), close, first=s.nonblank and not typed))
                    continue
                for suffix in (x.encode() for x in s.suffixes):
                    if suffix.startswith(after):
                        done |= suffix == after
                        ids += self.vocab.prefixes_of(suffix[len(after):])
            mask = torch.zeros(self.vocab.size, dtype=torch.bool)
            mask[ids] = True
            for m in masks:
                mask |= m
            if done or not mask.any():
                mask[list(self.eos)] = True
            self._cache[key] = mask
        return self._cache[key]
