"""The fp32 export (onnxruntime-genai builder, run by the build's export stage) computes what the
PyTorch model computes, for each tested architecture, with and without the KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.runtime.model import CausalLM

ATOL = 1e-4


def torch_logits(zoo, arch: str, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return zoo.torch_model(arch)(torch.tensor(ids)[None, :]).logits[0].numpy()


def test_fp32_logits_match_pytorch(zoo, arch):
    lm = CausalLM(zoo.fp32(arch), threads=1)
    ids = zoo.eval_ids(96, offset=100)
    ours = lm.logits(ids)
    ref = torch_logits(zoo, arch, ids)
    assert ours.shape == ref.shape == (96, lm.spec.vocab_size)
    assert ref.std() > 0.5, "the tiny model's logits are nearly flat: the comparison would prove little"
    diff = float(np.abs(ours - ref).max())
    assert diff < ATOL, f"{arch}: fp32 export differs from PyTorch by {diff:.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_genai_config_describes_the_model(zoo, arch):
    lm = CausalLM(zoo.fp32(arch), threads=1)
    cfg = zoo.torch_model(arch).config
    s = lm.spec
    assert (s.num_layers, s.num_kv_heads, s.head_size, s.vocab_size) == (
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.vocab_size,
    )
    assert s.eos_token_ids == (cfg.eos_token_id,)
    assert s.context_length == cfg.max_position_embeddings


def test_kv_cache_prefill_then_decode_equals_full_sequence(zoo, arch):
    lm = CausalLM(zoo.fp32(arch), threads=1)
    ids = zoo.eval_ids(40, offset=7)
    full = lm.logits(ids)
    n = 32
    prefill, cache = lm.forward(ids[None, :n], lm.empty_cache())
    assert len(cache) == 2 * lm.spec.num_layers
    assert all(c.shape == (1, lm.spec.num_kv_heads, n, lm.spec.head_size) for c in cache)
    np.testing.assert_allclose(prefill[0], full[:n], atol=ATOL, rtol=0)
    # one decode step, then the rest one token at a time: each equals the full pass at that position
    for pos in range(n, len(ids)):
        step, cache = lm.forward(ids[None, pos : pos + 1], cache)
        assert step.shape == (1, 1, lm.spec.vocab_size)
        diff = float(np.abs(step[0, -1] - full[pos]).max())
        assert diff < ATOL, f"{arch}: decode step at position {pos} differs from the full pass by {diff:.2e}"
    assert cache[0].shape[2] == len(ids)


def test_decode_from_cache_matches_pytorch(zoo, arch):
    """The cached path against PyTorch directly (not only against our own full pass)."""
    lm = CausalLM(zoo.fp32(arch), threads=1)
    ids = zoo.eval_ids(24, offset=300)
    _, cache = lm.forward(ids[None, :-1], lm.empty_cache())
    step, _ = lm.forward(ids[None, -1:], cache)
    ref = torch_logits(zoo, arch, ids)[-1]
    assert float(np.abs(step[0, -1] - ref).max()) < ATOL


@pytest.mark.parametrize("batch", [2])
def test_batched_forward(zoo, batch):
    """Two different rows in one batch give each row's own logits (the cache is per row)."""
    lm = CausalLM(zoo.fp32("llama"), threads=1)
    a, b = zoo.eval_ids(16, offset=0), zoo.eval_ids(16, offset=500)
    logits, cache = lm.forward(np.stack([a, b]), lm.empty_cache(batch))
    np.testing.assert_allclose(logits[0], lm.logits(a), atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[1], lm.logits(b), atol=ATOL, rtol=0)
