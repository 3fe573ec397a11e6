"""Fisher statistics for the size allocator: how much the model's output distribution moves when a
matrix's weights move, measured with one backward pass per calibration window.

Why: the mean KL between the fp32 and the quantized model, to second order in the weight error dW,
is 0.5 dW^T F dW with F the Fisher information of the model's own next-token distribution (the KL's
Hessian at dW = 0; HAWQ, SqueezeLLM). Its diagonal for a matrix W [K, N] with input x and output
y = x W is E[x_k^2 g_n^2] (g: the gradient of the log-likelihood at y), taken here as the product of
the two means, a_k b_n (K-FAC's factorisation, diagonal): one vector per input and one per output.
Unlike the relative output error, b carries what happens *after* the matrix: a projection whose
output the next norm or the attention softmax all but ignores gets a small b, one the logits hang
on a large one. Labels are sampled from the model itself (the true Fisher, which is the KL's
Hessian), not taken from the text.

The statistics come from the Hugging Face checkpoint in torch (the export has no gradients); each
ONNX matrix is matched to the checkpoint's ``nn.Linear`` layers by value, so fused projections
(qkv, gate_up) and the tied table need no per-architecture name table. A matrix that matches
nothing has no Fisher statistics, and the caller falls back to the relative output error for the
whole model (mixing the two scales would rank nonsense).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FisherStats", "LinearIndex", "fisher_pair", "fisher_statistics"]

logger = logging.getLogger(__name__)

# fp32 when the weights fit comfortably; beyond this, bf16 (a 2.5B model: 5 GB instead of 10)
_FP32_MAX_PARAMETERS = 1_000_000_000
_KEY = 4  # leading values of a weight column that index it


FisherStats = dict[str, tuple[np.ndarray, np.ndarray]]  # linear name -> (a [in], b [out]), means per token


def fisher_statistics(
    model_path: Path, windows: Iterable[np.ndarray], *, seed: int = 0, threads: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[FisherStats, dict[str, np.ndarray]]:
    """(a, b) of every ``nn.Linear`` of the checkpoint at ``model_path`` over the token ``windows``,
    and each linear's weight tensor [out, in] (what the ONNX matrices are matched against)."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), torch_dtype=torch.float32)
    if model.num_parameters() > _FP32_MAX_PARAMETERS:
        model = model.to(torch.bfloat16)
    model.eval()
    model.requires_grad_(False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    acc = {n: [torch.zeros(m.in_features, dtype=torch.float64), torch.zeros(m.out_features, dtype=torch.float64)] for n, m in linears.items()}
    hooks = []
    for name, mod in linears.items():
        hooks.append(mod.register_forward_hook(_forward_hook(acc[name])))
        hooks.append(mod.register_full_backward_hook(_backward_hook(acc[name])))
    gen = torch.Generator().manual_seed(seed)
    tokens = 0
    try:
        for i, w in enumerate(windows):
            ids = torch.as_tensor(np.asarray(w, dtype=np.int64)).reshape(1, -1)
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, use_cache=False).logits.float()[0]
            logp = torch.log_softmax(logits, dim=-1)
            labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)  # y ~ p: the true Fisher
            logp.gather(1, labels).sum().backward()
            tokens += ids.shape[1]
            if progress:
                progress(f"sensitivity: gradients of window {i + 1}")
    finally:
        for h in hooks:
            h.remove()
    stats = {n: ((a / max(tokens, 1)).numpy(), (b / max(tokens, 1)).numpy()) for n, (a, b) in acc.items()}
    return stats, {n: m.weight.detach() for n, m in linears.items()}


def _forward_hook(slot: list[Any]) -> Callable[..., None]:
    def hook(_mod: Any, inputs: tuple[Any, ...], _out: Any) -> None:
        x = inputs[0].detach().double()
        slot[0] += x.reshape(-1, x.shape[-1]).square().sum(0)

    return hook


def _backward_hook(slot: list[Any]) -> Callable[..., None]:
    def hook(_mod: Any, _grad_in: Any, grad_out: tuple[Any, ...]) -> None:
        g = grad_out[0].detach().double()
        slot[1] += g.reshape(-1, g.shape[-1]).square().sum(0)

    return hook


class LinearIndex:
    """The checkpoint's linears, findable by the leading values of their first output column (in
    bf16 precision, which a bf16 checkpoint and its fp32 export share)."""

    def __init__(self, weights: Mapping[str, Any]):
        self._weights = weights  # name -> torch tensor [out, in]
        self._index: dict[tuple[int, ...], list[str]] = {}
        for name, w in weights.items():
            self._index.setdefault(_column_key(w[0, :_KEY].float().numpy()), []).append(name)

    def split(self, w: np.ndarray) -> list[str] | None:
        """The linears whose weights, side by side, are the ONNX matrix ``w`` [K, N]; None if none."""
        parts: list[str] = []
        col = 0
        while col < w.shape[1]:
            found = next((c for c in self._index.get(_column_key(w[:_KEY, col]), []) if self._fits(c, w, col)), None)
            if found is None:
                return None
            parts.append(found)
            col += int(self._weights[found].shape[0])
        return parts

    def _fits(self, name: str, w: np.ndarray, col: int) -> bool:
        lw = self._weights[name]
        n = int(lw.shape[0])
        if lw.shape[1] != w.shape[0] or col + n > w.shape[1]:
            return False
        return bool(np.allclose(w[:, col:col + n], lw.float().numpy().T, rtol=1e-2, atol=1e-6))


def fisher_pair(stats: FisherStats, parts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of an ONNX matrix made of the linears ``parts`` side by side (they share the input)."""
    return stats[parts[0]][0], np.concatenate([stats[p][1] for p in parts])


def _column_key(col: np.ndarray) -> tuple[int, ...]:
    bits = np.asarray(col, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return tuple(int(v) for v in (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)  # round to nearest even bf16
