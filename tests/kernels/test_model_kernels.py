"""The real Llama model with every kernel on (model.kernels: triton) equals every kernel off."""

from __future__ import annotations

import pytest
import torch

from eurotrain.models import ModelConfig, build_model


def loss_and_grads(
    kernels: str, cfg_kwargs: dict
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    cfg = ModelConfig(kernels=kernels, **cfg_kwargs)
    model = build_model(cfg, "cpu")
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -3:] = -100  # ignored positions go through the fused loss too
    loss = model(tokens, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, model.ops.describe()


@pytest.mark.parametrize(
    "shape",
    [
        dict(dim=96, num_heads=6, num_kv_heads=2, ffn_dim=200, max_seq_len=64),  # non-power-of-two
        dict(dim=64, num_heads=4, num_kv_heads=4, ffn_dim=176, max_seq_len=64, tie_embeddings=True),
    ],
)
def test_model_loss_and_gradients_equal_with_kernels_on_and_off(shape: dict) -> None:
    ref_loss, ref_grads, ref_impl = loss_and_grads("torch", shape)
    loss, grads, impl = loss_and_grads("triton", shape)
    assert set(ref_impl.values()) == {"torch"}
    assert set(impl.values()) == {"triton"}, impl  # the kernels really ran
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
