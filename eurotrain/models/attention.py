"""Attention on [B, S, H, D] tensors: causal, within documents, within a sliding window.

``attention(q, k, v, mask)`` is what every layer calls. ``mask`` None is plain causal attention
through SDPA's ``is_causal`` path (bit for bit what a model without masks computes). Otherwise it
is an ``AttentionMask`` that the model makes once per forward and all layers share:

- ``documents`` [B, S]: the document index of every token attention sees. In a row of packed
  documents a token attends only to earlier tokens of its own document. Under Ulysses context
  parallelism attention sees whole sequences (the all-to-all hands each rank all tokens of a
  subset of heads), so this is always the whole row, even where the model holds a slice of it.
- ``window``: a sliding window (Mistral): a token attends to itself and the ``window - 1``
  tokens before it (HF's ``kv_idx > q_idx - sliding_window``).

How the mask is applied is decided per call from the device and logged once:

- CUDA: FlexAttention (compiled) with a BlockMask, which skips the blocks that are entirely
  masked (most of them, for short documents or a short window).
- elsewhere: SDPA with a dense boolean [B, 1, S, S] mask. torch 2.13's FlexAttention has no CPU
  backward, and SDPA with an explicit mask computes exactly the masked softmax; the mask costs
  S^2 bytes per row next to the S^2 floats per head of attention itself.

The mask is materialised by the first layer that needs it and reused by the others: it depends
only on the documents, the window, the sequence length and the device.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("eurotrain.models")
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """[B, S] document index of each token from per-document positions (which restart at 0 at
    every document start and at the start of each row, as data.document_positions serves them)."""
    return (positions == 0).cumsum(-1)


@dataclass
class AttentionMask:
    """What attention may not see besides the future: other documents, tokens past a window."""

    documents: torch.Tensor | None = None
    """[B, S] document index per token of the whole sequence attention sees; None: one
    document per row."""
    window: int | None = None
    """Sliding window (a token sees itself and window - 1 tokens before it); None: no window."""
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def _check(self, seq_len: int) -> None:
        if self.documents is not None and self.documents.shape[-1] != seq_len:
            raise ValueError(
                f"attention sees {seq_len} tokens per row but the documents cover "
                f"{self.documents.shape[-1]}: pass the document ids of the whole sequence"
            )

    @torch.compiler.disable
    def dense(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Boolean [B or 1, 1, S, S], True where a query (row) may attend to a key (column)."""
        key = ("dense", seq_len, device)
        if key not in self._cache:
            self._check(seq_len)
            idx = torch.arange(seq_len, device=device)
            distance = idx[:, None] - idx[None, :]
            keep = distance >= 0
            if self.window is not None:
                keep = keep & (distance < self.window)
            keep = keep[None, None]
            if self.documents is not None:
                docs = self.documents.to(device)
                keep = keep & (docs[:, None, :, None] == docs[:, None, None, :])
            self._cache[key] = keep
        return self._cache[key]

    def mask_mod(self, device: torch.device) -> Any:
        """FlexAttention's mask_mod of the pattern ``dense`` builds: True where query q_idx of
        row b may attend to key kv_idx."""
        docs = None if self.documents is None else self.documents.to(device)
        window = self.window

        def mask_mod(b, h, q_idx, kv_idx):
            keep = q_idx >= kv_idx
            if window is not None:
                keep = keep & (q_idx - kv_idx < window)
            if docs is not None:
                keep = keep & (docs[b, q_idx] == docs[b, kv_idx])
            return keep

        return mask_mod

    @torch.compiler.disable
    def block_mask(self, seq_len: int, device: torch.device) -> Any:
        """FlexAttention's BlockMask of the same pattern (CUDA)."""
        key = ("block", seq_len, device)
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            self._check(seq_len)
            batch = None if self.documents is None else self.documents.shape[0]
            self._cache[key] = create_block_mask(
                self.mask_mod(device), batch, None, seq_len, seq_len, device=device, _compile=True
            )
        return self._cache[key]


@functools.cache
def _compiled_flex_attention() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention materialises the whole score matrix; compiled, it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None = None
) -> torch.Tensor:
    """Attention on [B, S, H, D] tensors; KV heads are shared by groups of query heads."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    seq_len = q.shape[2]
    if mask is not None and q.is_cuda:
        _log_once("eurotrain.models: masked attention runs FlexAttention (compiled, block mask)")
        out = _compiled_flex_attention()(
            q, k, v, block_mask=mask.block_mask(seq_len, q.device), enable_gqa=groups > 1
        )
        return out.transpose(1, 2)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        _log_once(
            f"eurotrain.models: masked attention runs SDPA with a dense boolean mask on "
            f"{q.device.type} (FlexAttention is used on CUDA)"
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(seq_len, q.device))
    return out.transpose(1, 2)
