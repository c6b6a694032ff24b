"""Auxiliary targets that teach the tiny text encoders the scene a caption describes.

Trained only through the diffusion loss, the encoders learned colours and the axis of a relation
but not its direction: "a red square above a blue circle" and "... below ..." drew the same
picture (CLIP's pooled vector was nearly constant, and the T5 states did not say which object
is on top). Two small heads, used in training only and not shipped, fix that:

- on CLIP's pooled output: the scene as slots (colour and shape of the top/left object, of the
  bottom/right one, the axis, the background), identical for a caption and its converse;
- on each T5 output token: is this word about the top/left object, the other one, or neither.

Example:
    >>> slots, roles = caption_labels("a red circle above a blue square")
    >>> slots.tolist(), roles[:8].tolist()
    ([0, 0, 4, 1, 1, 8], [1, 1, 1, 0, 2, 2, 2, 0])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shapes_data import COLOURS, MAX_TOKENS, SHAPES

_C, _S = {c: i for i, c in enumerate(COLOURS)}, {s: i for i, s in enumerate(SHAPES)}
# classes per slot: colour A (+none), shape A (+none), colour B, shape B, axis, background (+grey)
SLOT_SIZES = (len(_C) + 1, len(_S) + 1, len(_C) + 1, len(_S) + 1, 3, len(_C) + 1)


def caption_labels(caption: str):
    """caption -> (slots LongTensor [6], roles LongTensor [MAX_TOKENS]) for the T5 word positions.

    roles: 1 = word of the top/left object (or the only one), 2 = of the other object, 0 = else.
    """
    words = caption.split()
    roles = torch.zeros(MAX_TOKENS, dtype=torch.long)
    first = (words[1], words[2])
    bg = _C[words[-2]] if words[-1] == "background" else len(_C)
    rel_len = 2 if len(words) > 4 and words[4] == "of" else 1
    if len(words) > 3 and words[3] in ("above", "below", "left", "right"):
        rel = words[3]
        second = (words[4 + rel_len], words[5 + rel_len])
        first_is_a = rel in ("above", "left")
        a, b = (first, second) if first_is_a else (second, first)
        roles[0:3] = 1 if first_is_a else 2
        roles[3 + rel_len:6 + rel_len] = 2 if first_is_a else 1
        axis = 1 if rel in ("above", "below") else 2
        slots = [_C[a[0]], _S[a[1]], _C[b[0]], _S[b[1]], axis, bg]
    else:
        roles[0:3] = 1
        slots = [_C[first[0]], _S[first[1]], len(_C), len(_S), 0, bg]
    return torch.tensor(slots), roles


def label_captions(captions):
    """[N] captions -> (slots [N, 6], roles [N, MAX_TOKENS])."""
    slots, roles = zip(*(caption_labels(c) for c in captions))
    return torch.stack(slots), torch.stack(roles)


class TextHeads(nn.Module):
    """Linear read-outs: pooled CLIP [B, dim] -> slot logits; T5 tokens [B, T, dim] -> role logits."""

    def __init__(self, clip_dim: int = 64, t5_dim: int = 64):
        super().__init__()
        self.slots = nn.Linear(clip_dim, sum(SLOT_SIZES))
        self.roles = nn.Linear(t5_dim, 3)

    def loss(self, pooled, t5_out, slots, roles):
        """Mean cross-entropy over the 6 slots plus over the T5 word roles."""
        logits = self.slots(pooled).split(SLOT_SIZES, dim=-1)           # 6 x [B, k]
        slot_loss = sum(F.cross_entropy(lg, slots[:, i]) for i, lg in enumerate(logits)) / 6
        role_loss = F.cross_entropy(self.roles(t5_out).flatten(0, 1), roles.flatten())
        return slot_loss + role_loss


def pretrain_text(clip, t5, heads: TextHeads, data: dict, steps: int, log, batch: int = 64) -> None:
    """Fit the text encoders and heads to the auxiliary targets alone (cheap: text only).

    data: the latent cache with clip_ids/t5_ids [N, 16], their converse *_alt ids, slots [N, 6],
    roles / roles_alt [N, 16]. Run before (or on joining) the diffusion training.
    """
    params = [*clip.parameters(), *t5.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(123)
    n = data["clip_ids"].shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        alt = (torch.rand(batch, generator=gen) < 0.5)[:, None]
        pick = lambda key: torch.where(alt, data[key + "_alt"][idx], data[key][idx])  # noqa: E731
        pooled = clip(pick("clip_ids")).pooler_output                    # [B, 64]
        t5_out = t5(pick("t5_ids"))[0]                                    # [B, 16, 64]
        loss = heads.loss(pooled, t5_out, data["slots"][idx], pick("roles"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"text pretrain step {step + 1} aux loss {loss.item():.4f}")
