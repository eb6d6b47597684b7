"""Document-masked and sliding-window attention: a row of packed documents computes, token for
token, what each document computes alone; the mask is the pattern it claims to be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eurotrain.data.sources import document_positions
from eurotrain.models import ModelConfig, build_model
from eurotrain.models.attention import AttentionMask, document_ids

CFG = ModelConfig(vocab_size=96, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128)


def _model(cfg: ModelConfig):
    model = build_model(cfg, "cpu")
    model.init_weights(seed=5)
    return model.eval()


def _packed(doc_lengths: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document positions and document ids of rows packed from ``doc_lengths``, through the
    data pipeline's own helper (documents end where the next one starts)."""
    rows = []
    for lengths in doc_lengths:
        ends = np.cumsum(lengths)
        pos, _ = document_positions(ends, np.array([0]), int(ends[-1]))
        rows.append(pos[0])
    positions = torch.from_numpy(np.stack(rows))
    return positions, document_ids(positions)


@pytest.mark.parametrize("window", [None, 6], ids=["causal", "sliding-window-6"])
def test_packed_row_equals_each_document_alone(window):
    cfg = ModelConfig(**{**CFG.__dict__, "sliding_window": window})
    model = _model(cfg)
    layouts = [[5, 12, 15], [32]]
    positions, documents = _packed(layouts)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        packed = model(tokens, positions=positions, documents=documents)
        packed_loss = model(tokens, labels, positions=positions, documents=documents)
        alone_loss = torch.zeros(())
        for row, lengths in enumerate(layouts):
            start = 0
            for n in lengths:
                doc = slice(start, start + n)
                alone = model(tokens[row : row + 1, doc])[0]
                torch.testing.assert_close(packed[row, doc], alone, rtol=1e-5, atol=1e-5)
                alone_loss += F.cross_entropy(alone, labels[row, doc], reduction="sum")
                start += n
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-5)
    # Without the mask the documents see each other: the first row's later documents change.
    with torch.no_grad():
        unmasked = model(tokens)
    assert not torch.allclose(unmasked[0, 5:], packed[0, 5:], atol=1e-3)


def test_gradients_stay_within_documents():
    """The loss of the second document has no gradient with respect to the first's tokens."""
    model = _model(CFG)
    positions, documents = _packed([[10, 22]])
    tokens = torch.randint(0, CFG.vocab_size, (1, 32))
    hidden = model.tok_embeddings(tokens).detach().requires_grad_(True)
    model.tok_embeddings = None  # as a later pipeline stage: hidden states in
    out = model(hidden, positions=positions, documents=documents)
    out[0, 10:].sum().backward()
    assert hidden.grad is not None
    assert hidden.grad[0, :10].abs().max() == 0
    assert hidden.grad[0, 10:].abs().max() > 0


def test_mask_pattern():
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    mask = AttentionMask(docs, window=2).dense(6, torch.device("cpu"))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)
    with pytest.raises(ValueError, match="attention sees 8 tokens per row but the documents"):
        AttentionMask(docs).dense(8, torch.device("cpu"))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("documents", [False, True])
def test_flex_attention_mask_mod_is_the_dense_pattern(window, documents):
    """The mask_mod behind CUDA's FlexAttention block mask keeps exactly what the dense mask of
    the SDPA path keeps (evaluated on the CPU through FlexAttention's own create_mask)."""
    from torch.nn.attention.flex_attention import create_mask

    cpu = torch.device("cpu")
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1]]) if documents else None
    mask = AttentionMask(docs, window)
    dense = mask.dense(8, cpu).expand(2, 1, 8, 8)
    flex = create_mask(mask.mask_mod(cpu), 2, 1, 8, 8, device=cpu)
    assert torch.equal(flex, dense)
