"""Generation with the runtime: greedy equals PyTorch's greedy ``generate`` on the fp32 export;
seeded sampling is reproducible; top_k=1 is greedy."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.runtime.generate import GenerationConfig, generate
from edgepipe.runtime.model import CausalLM

NEW = 20


def torch_greedy(zoo, arch: str, prompt: list[int], n: int) -> list[int]:
    import torch

    model = zoo.torch_model(arch)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n, do_sample=False, pad_token_id=model.config.eos_token_id,
        )
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch_", ["llama", "granite", "qwen2", "phi3"])
def test_greedy_equals_pytorch_generate(zoo, arch_):
    lm = CausalLM(zoo.fp32(arch_), threads=1)
    prompt = zoo.eval_ids(12, offset=40).tolist()
    ours = list(generate(lm, prompt, GenerationConfig(max_new_tokens=NEW)))
    ref = torch_greedy(zoo, arch_, prompt, NEW)
    assert len(ref) == NEW, "PyTorch stopped early (EOS): pick another prompt"
    assert ours == ref


def test_greedy_is_argmax_of_full_pass(zoo):
    """Every greedy token is the argmax of a full (uncached) pass over the sequence so far."""
    lm = CausalLM(zoo.artifact("llama", "x86-avx2")[0], threads=1)
    prompt = zoo.eval_ids(8, offset=900).tolist()
    toks = list(generate(lm, prompt, GenerationConfig(max_new_tokens=10)))
    assert len(toks) == 10
    seq = prompt + toks
    full = lm.logits(np.array(seq))
    assert full[len(prompt) - 1 : -1].argmax(-1).tolist() == toks


def test_sampling_is_seeded_and_top_k_1_is_greedy(zoo):
    lm = CausalLM(zoo.fp32("llama"), threads=1)
    prompt = zoo.eval_ids(10, offset=77).tolist()
    greedy = list(generate(lm, prompt, GenerationConfig(max_new_tokens=NEW)))
    hot = GenerationConfig(max_new_tokens=NEW, temperature=1.5, seed=1234)
    a = list(generate(lm, prompt, hot))
    b = list(generate(lm, prompt, hot))
    assert a == b and len(a) == NEW
    c = list(generate(lm, prompt, GenerationConfig(max_new_tokens=NEW, temperature=1.5, seed=4321)))
    assert c != a, "a different seed gave the same 20 sampled tokens"
    assert a != greedy
    top1 = list(generate(lm, prompt, GenerationConfig(max_new_tokens=NEW, temperature=1.5, top_k=1, seed=99)))
    assert top1 == greedy
    tiny_p = list(generate(lm, prompt, GenerationConfig(max_new_tokens=NEW, temperature=1.0, top_p=1e-6, seed=5)))
    assert tiny_p == greedy


def test_stops_at_eos_and_context(zoo):
    lm = CausalLM(zoo.fp32("llama"), threads=1)
    prompt = zoo.eval_ids(10, offset=5).tolist()
    greedy = list(generate(lm, prompt, GenerationConfig(max_new_tokens=5)))
    # make the 3rd greedy token the EOS: generation stops before it
    eos = greedy[2]
    lm.spec = type(lm.spec)(**{**lm.spec.__dict__, "eos_token_ids": (eos,)})
    assert list(generate(lm, prompt, GenerationConfig(max_new_tokens=5))) == greedy[: greedy.index(eos)]
    lm.spec = type(lm.spec)(**{**lm.spec.__dict__, "eos_token_ids": (), "context_length": len(prompt) + 3})
    assert len(list(generate(lm, prompt, GenerationConfig(max_new_tokens=50)))) == 3


def test_kv_buffer_stepper_matches_concatenating_cache(llama_artifact) -> None:
    """The preallocated, in-place KV buffer (IO binding) gives the same logits as the
    concatenating cache, step by step, after a multi-token prefill."""
    import numpy as np

    from edgepipe.runtime.model import CausalLM

    lm = CausalLM(llama_artifact)  # the int4 artifact: MatMulNBits + GatherBlockQuantized + GQA
    ids = np.array([5, 17, 42, 8, 99, 3, 21], dtype=np.int64)
    logits, cache = lm.forward(ids[None, :4], lm.empty_cache())
    state = lm.stepper(16)
    np.testing.assert_allclose(state.step(ids[:4]), logits[0], atol=1e-5)
    for t in ids[4:]:
        logits, cache = lm.forward(np.array([[t]]), cache)
        np.testing.assert_allclose(state.step(np.array([t])), logits[0], atol=1e-5)
    assert state.length == len(ids)


def test_kv_stepper_rebinds_only_shapes_and_returns_its_own_buffer(llama_artifact) -> None:
    """Steps of changing length (a last-only prompt, one-token steps, a rewind, a multi-token
    verify step, last-only again) each give the concatenating cache's logits for the same chunks;
    the logits a step returns are a view of the stepper's own buffer (onnxruntime writes into it:
    no logits array per step), so the next step overwrites them."""
    from edgepipe.runtime.model import CausalLM

    lm = CausalLM(llama_artifact)
    ids = np.array([5, 17, 42, 8, 99, 3, 21, 64, 11], dtype=np.int64)
    state = lm.stepper(len(ids))
    cache = lm.empty_cache()

    def ref(chunk: slice) -> np.ndarray:
        nonlocal cache
        logits, cache = lm.forward(ids[None, chunk], cache)
        return logits[0]

    np.testing.assert_allclose(state.step(ids[:4], last_only=True), ref(slice(0, 4))[-1:], atol=1e-5)
    a = state.step(ids[4:5], last_only=True)
    np.testing.assert_allclose(a, ref(slice(4, 5)), atol=1e-5)
    b = state.step(ids[5:6])
    assert np.shares_memory(a, b), "one-token steps should return the same buffer"
    np.testing.assert_allclose(b, ref(slice(5, 6)), atol=1e-5)
    state.rewind(4)
    cache = [c[:, :, :4] for c in cache]
    np.testing.assert_allclose(state.step(ids[4:8]), ref(slice(4, 8)), atol=1e-5)
    np.testing.assert_allclose(state.step(ids[8:], last_only=True), ref(slice(8, 9)), atol=1e-5)
    assert state.length == len(ids)


def test_kv_stepper_prefills_in_chunks(zoo) -> None:
    """A prompt longer than ``prefill_chunk`` runs in chunks and gives one run's logits (every
    position, or the last only) and the same greedy tokens; on the fp32 export, since quantized
    kernels round differently for one row and for several."""
    ids = zoo.eval_ids(11, offset=3)
    whole = CausalLM(zoo.fp32("llama"), threads=1, prefill_chunk=0)
    chunked = CausalLM(zoo.fp32("llama"), threads=1, prefill_chunk=4)
    ref = whole.stepper(16).step(ids).copy()
    np.testing.assert_allclose(chunked.stepper(16).step(ids), ref, atol=1e-4)
    np.testing.assert_allclose(chunked.stepper(16).step(ids, last_only=True), ref[-1:], atol=1e-4)
    prompt = ids.tolist()
    assert list(generate(chunked, prompt, GenerationConfig(max_new_tokens=8))) == list(
        generate(whole, prompt, GenerationConfig(max_new_tokens=8))
    )
