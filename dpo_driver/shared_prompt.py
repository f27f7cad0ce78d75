"""One forward per preference pair: chosen and rejected share their prompt's tokens.

TRL's DPO collator lays B pairs out as 2B rows, [prompt + chosen] then [prompt + rejected], and the
policy and the reference both run on every row: each prompt (about 250 tokens on MiniWoB, against
completions of about 10) is computed twice per pair, twice per step. Packed, a pair is one row,
`chosen + rejected[s-1:]` where s is the length the two rows share: the rejected tail restarts at
position s-1 and its mask hides the chosen tail, so every token sees exactly the context it sees
in its own row. The per-token outputs (log-probs, entropy, ...) and their gradients are TRL's,
from about half the tokens. A batch that is not such a layout runs TRL's forward unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_IGNORE = -100
# Attention kernels that take an arbitrary (batch, 1, q, k) mask; flash attention does not.
_MASKABLE = ("sdpa", "eager")


@dataclass
class Packed:
    input_ids: torch.Tensor  # (B, T): pair i's chosen row, then its rejected row from the shared length s-1 on
    position_ids: torch.Tensor  # (B, T): the rejected tail restarts at s-1
    allowed: torch.Tensor  # (B, 1, T, T) bool: causal, within the row's length, rejected tail blind to the chosen tail
    shift_labels: torch.Tensor  # (B, T): the token each packed position scores, -100 where none
    src: tuple[torch.Tensor, torch.Tensor]  # (pair, packed position) of each unpacked output ...
    dst: tuple[torch.Tensor, torch.Tensor]  # ... and its (row, position) in TRL's (2B, L-1) layout


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int) -> Packed | None:
    """Pack TRL's preference batch ([chosen rows; rejected rows], right-padded) into one row per pair;
    None when the batch is not that layout (odd rows, holes in a mask, rows sharing no token)."""
    n = input_ids.size(0)
    if n == 0 or n % 2:
        return None
    lengths = attention_mask.sum(1).tolist()
    if any(not bool(attention_mask[i, :lengths[i]].all()) for i in range(n)):
        return None
    pairs = n // 2
    rows, pos, labs, spans, src, dst = [], [], [], [], [], []
    for i in range(pairs):
        lc, lr = lengths[i], lengths[pairs + i]
        c, r = input_ids[i, :lc], input_ids[pairs + i, :lr]
        m = min(lc, lr)
        same = (c[:m] == r[:m]) & (labels[i, :m] == labels[pairs + i, :m])
        s = m if bool(same.all()) else int((~same).int().argmax())
        if s == 0:
            return None
        tail = r[s - 1:]
        rows.append(torch.cat([c, tail]))
        pos.append(torch.cat([torch.arange(lc), torch.arange(s - 1, lr)]))
        # Position q scores the token its own row has next: chosen's next, or the rejected tail's next.
        next_c = torch.cat([labels[i, 1:lc], torch.tensor([_IGNORE])])
        next_r = torch.cat([labels[pairs + i, s:lr], torch.tensor([_IGNORE])])
        labs.append(torch.cat([next_c, next_r]))
        spans.append((lc, s))
        # TRL's output at (row, t) scores token t+1 of the row, for t < length-1.
        t_c = torch.arange(lc - 1)
        t_r = torch.arange(lr - 1)
        src += [(i, t_c), (i, torch.where(t_r < s - 1, t_r, t_r + lc - s + 1))]
        dst += [(i, t_c), (pairs + i, t_r)]
    total = max(len(x) for x in rows)
    ids = torch.full((pairs, total), pad_id, dtype=input_ids.dtype)
    position_ids = torch.zeros((pairs, total), dtype=torch.long)
    shift_labels = torch.full((pairs, total), _IGNORE, dtype=labels.dtype)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    allowed = causal.repeat(pairs, 1, 1, 1)
    for i, (row, (lc, s)) in enumerate(zip(rows, spans, strict=True)):
        ids[i, :len(row)], position_ids[i, :len(row)], shift_labels[i, :len(row)] = row, pos[i], labs[i]
        allowed[i, 0, :, len(row):] = False
        allowed[i, 0, lc:, s - 1:lc] = False  # the rejected tail never sees the chosen tail (padding queries keep its keys)
    def flat(parts):
        return (torch.cat([torch.full_like(t, row) for row, t in parts]), torch.cat([t for _, t in parts]))
    device = input_ids.device
    return Packed(ids.to(device), position_ids.to(device), allowed.to(device), shift_labels.to(device),
                  tuple(x.to(device) for x in flat(src)), tuple(x.to(device) for x in flat(dst)))


def _unpack(out, packed: Packed, labels: torch.Tensor):
    """The packed forward's per-token outputs back in TRL's (2B, L-1) layout."""
    mask = labels[:, 1:] != _IGNORE
    shape = mask.shape

    def place(x):
        if x is None:
            return None
        return x.new_zeros(shape).index_put(packed.dst, x[packed.src]).masked_fill(~mask, 0)

    log_probs = place(out.log_probs)
    return type(out)(loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs, entropy=place(out.entropy),
                     log_sum_sq_probs=place(out.log_sum_sq_probs), mean_logits=place(out.mean_logits),
                     is_top1=place(out.is_top1), label_mask=mask, aux_loss=out.aux_loss)


def share_prompts(model) -> None:
    """Run `model`'s fused-LM-head forward (TRL's `add_fused_lm_head`, which the DPO trainer installs)
    on packed pairs: one row per pair instead of two (see the module's doc). Other calls (generation,
    the demo anchor's SFT loss) go through unchanged."""
    fused = model.forward
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @functools.wraps(fused)
    def forward(*args, fused_lm_head=False, labels=None, **kwargs):
        attn = getattr(model.config, "_attn_implementation", None)
        rest = {k for k, v in kwargs.items() if v is not None and k not in ("input_ids", "attention_mask", "use_cache")}
        packed = None
        if fused_lm_head and labels is not None and not args and not rest and attn in _MASKABLE \
                and kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 2:
            packed = pack_pairs(kwargs["input_ids"], kwargs["attention_mask"], labels, pad_id)
        if packed is None:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        mask = packed.allowed
        if attn == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        out = fused(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                    shift_labels=packed.shift_labels, fused_lm_head=True, use_cache=False)
        return _unpack(out, packed, labels)

    model.forward = forward
