"""SafeCLIP's losses: the CLIP loss (plain and cross-augmented) and the unimodal
InfoNCE loss (in-batch, or nearest-neighbour with a FIFO memory bank as in NNCLR).

All functions take L2-normalised embeddings of shape (batch, dim). Row i of one
tensor is the positive of row i of the other; every other row is a negative.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .distributed import Dist

MAX_LOGIT_SCALE = 100.0  # CLIP's temperature clamp: logits are at most 100 x cosine


def clamp_logit_scale_(logit_scale: torch.nn.Parameter) -> None:
    """Clamp the learnable log-scale in place after an optimizer step (as open_clip
    does), so exp(logit_scale) never exceeds 100 and cannot drift beyond it."""
    with torch.no_grad():
        logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))


def info_nce(queries: torch.Tensor, keys: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of cross-entropy over rows and over columns of
    scale * queries @ keys.T, with the diagonal as targets."""
    logits = scale * queries @ keys.t()
    labels = torch.arange(len(queries), device=queries.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: float | torch.Tensor, *,
              ctx: "Dist | None" = None, local_loss: bool = False) -> torch.Tensor:
    """CLIP's loss at `scale` (the model's exp(logit_scale), clamped at 100 here).

    Under torchrun the features of every rank are gathered first (gradient into this
    rank's rows, as open_clip's ClipLoss): each rank computes the same global loss, or
    with `local_loss` its own rows against every rank's columns."""
    from .distributed import gather_features

    scale = torch.as_tensor(scale).clamp(max=MAX_LOGIT_SCALE)
    if ctx is None or not ctx.enabled:
        return info_nce(image_emb, text_emb, scale)
    (all_image, offset), (all_text, _) = gather_features(image_emb, ctx), gather_features(text_emb, ctx)
    if not local_loss:
        return info_nce(all_image, all_text, scale)
    logits_image = scale * image_emb @ all_text.t()
    logits_text = scale * text_emb @ all_image.t()
    labels = torch.arange(len(image_emb), device=image_emb.device) + offset
    return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))


def cross_clip_loss(image1: torch.Tensor, image2: torch.Tensor, text1: torch.Tensor, text2: torch.Tensor,
                    scale: float | torch.Tensor, *, ctx: "Dist | None" = None, local_loss: bool = False
                    ) -> torch.Tensor:
    """SafeCLIP's CLIP loss on augmented views: image view 1 against text view 2 and
    image view 2 against text view 1, averaged."""
    return 0.5 * (clip_loss(image1, text2, scale, ctx=ctx, local_loss=local_loss)
                  + clip_loss(image2, text1, scale, ctx=ctx, local_loss=local_loss))


class MemoryBank(torch.nn.Module):
    """A FIFO queue of past embeddings for nearest-neighbour positives (NNCLR).

    The bank is a buffer, not a parameter: it is filled from detached embeddings,
    so no gradient ever flows into it. Until it holds anything, lookups return the
    query itself (the loss then reduces to in-batch InfoNCE)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError("memory bank size must be >= 1")
        self.size = size
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))    # next slot to overwrite
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # valid rows

    def entries(self) -> torch.Tensor:
        return self.bank[: int(self.filled)]

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Each query's nearest neighbour (max inner product) in the bank, detached.

        A plain matrix product: for a bank rebuilt every step it is what a flat
        faiss index would compute, without copying the bank into an index."""
        entries = self.entries()
        if len(entries) == 0:
            return queries.detach().clone()
        entries = entries.to(queries.dtype)
        best_score = torch.full((len(queries),), -float("inf"), device=queries.device)
        best_index = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
        # In fp32 even under bf16 autocast (the GPU default): similarities rounded to
        # bf16's 3 digits tie, and the neighbour would depend on the precision.
        with torch.autocast(device_type=queries.device.type, enabled=False):
            for start in range(0, len(entries), chunk):
                block = entries[start: start + chunk].float()
                scores, index = (queries.detach().float() @ block.t()).max(dim=1)
                better = scores > best_score
                best_score = torch.where(better, scores, best_score)
                best_index = torch.where(better, index + start, best_index)
        return entries[best_index].clone()

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor) -> None:
        """Enqueue embeddings, overwriting the oldest once full."""
        embeddings = embeddings.detach().to(self.bank.dtype)[-self.size:]
        n, ptr = len(embeddings), int(self.ptr)
        first = min(n, self.size - ptr)
        self.bank[ptr: ptr + first] = embeddings[:first]
        self.bank[: n - first] = embeddings[first:]
        self.ptr.fill_((ptr + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))


def _one_way_nce(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * queries @ keys.t()
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def unimodal_loss(view1: torch.Tensor, view2: torch.Tensor, temperature: float,
                  bank: MemoryBank | None = None) -> torch.Tensor:
    """InfoNCE between two views of one modality, symmetrised.

    Without a bank: in-batch InfoNCE (row i of view 1 against all of view 2, and
    the reverse). With a bank (NNCLR): each view's query is replaced by its
    nearest neighbour among past embeddings — a positive that is a *different*
    sample of the same kind — scored against the other view's embeddings; then
    view 1 is enqueued. Neighbours are detached, so the gradient reaches the
    encoder through the other view only and never the bank."""
    scale = 1.0 / temperature
    if bank is None:
        return 0.5 * (_one_way_nce(view1, view2, scale) + _one_way_nce(view2, view1, scale))
    loss = 0.5 * (_one_way_nce(bank.nearest(view1), view2, scale)
                  + _one_way_nce(bank.nearest(view2), view1, scale))
    bank.push(view1)
    return loss
