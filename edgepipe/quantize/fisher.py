"""Fisher statistics for the size allocator: how much the model's output distribution moves when a
matrix's weights move, measured with one backward pass per calibration window.

Why: the mean KL between the fp32 and the quantized model, to second order in the weight error dW,
is 0.5 dW^T F dW with F the Fisher information of the model's own next-token distribution (the KL's
Hessian at dW = 0; HAWQ, SqueezeLLM). Its diagonal for a matrix W [K, N] with input x and output
y = x W is E[x_k^2 g_n^2] (g: the gradient of the log-likelihood at y), summed over tokens whole
for models up to ``EXACT_MAX_PARAMETERS`` (an array the size of the weights), and beyond that taken
as the product of the two means, a_k b_n (K-FAC's factorisation, diagonal): one vector per input
and one per output, so a 2.5B model needs no second copy of its weights. Unlike the relative
output error, the gradient carries what happens *after* the matrix: a projection whose output the
next norm or the attention softmax all but ignores weighs little, one the logits hang on much.
Labels are sampled from the model itself (the true Fisher, which is the KL's Hessian), not taken
from the text.

The statistics come from the Hugging Face checkpoint in torch (the export has no gradients); each
ONNX matrix is matched to the checkpoint's ``nn.Linear`` (and GPT-2 ``Conv1D``) layers by value, so fused projections
(qkv, gate_up) and the tied table need no per-architecture name table. A matrix that matches
nothing has no Fisher statistics, and the caller falls back to the relative output error for the
whole model (mixing the two scales would rank nonsense).

An untied input embedding E [vocab, hidden] is a matrix too: a token's one-hot row times E, so its
Fisher diagonal is E[onehot_v g_h^2] with g the gradient at the embedding's output, i.e. the
squared gradient of the rows the calibration tokens read (a token never read weighs nothing: one
lookup reads one row, so how often a row is read is what its error costs). It is kept under the
``nn.Embedding``'s name in the orientation of its export matrix, [hidden, vocab] (a over the hidden
size, b the token frequencies), and indexed by its rows like a linear's output columns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FisherStats", "LinearIndex", "Part", "fisher_pair", "fisher_statistics"]

logger = logging.getLogger(__name__)

# fp32 when the weights fit comfortably; beyond this, bf16 (a 2.5B model: 5 GB instead of 10)
FP32_MAX_PARAMETERS = 1_000_000_000
_KEY = 4  # leading values of a weight column that index it
_BIG_PIECE = 128  # tokens per forward / backward pass of a model beyond FP32_MAX_PARAMETERS
# Up to this size the diagonal is kept whole, E[x_k^2 g_n^2] per weight (one fp32 array the size of the
# weights); beyond, the factorised a_k b_n. On SmolLM2-135M at 100.56 MiB the whole diagonal gave
# KL 0.0446 against 0.0450 factorised (benchmarks/RESULTS.md).
EXACT_MAX_PARAMETERS = 600_000_000


# linear name -> (a [in], b [out], F [in, out] or None): means per token; F the unfactorised diagonal
FisherStats = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def fisher_statistics(
    model_path: Path, windows: Iterable[np.ndarray], *, num_parameters: int, seed: int = 0, threads: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[FisherStats, LinearIndex]:
    """(a, b, F) of every ``nn.Linear`` of the checkpoint at ``model_path`` over the token ``windows``,
    and the index the ONNX matrices are matched with (a few rows per linear: the model itself is
    freed on return, before the long per-matrix part, so a 2.5B model is not held twice)."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    # loaded in the dtype it is used in: a 2.5B model read as fp32 first would peak at 10 GB
    dtype = torch.float32 if num_parameters <= FP32_MAX_PARAMETERS else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    weights = _linear_weights(model)
    linears = {n: m for n, m in model.named_modules() if n in weights}
    lookup = _untied_embedding(model, weights)
    if lookup is not None:
        weights[lookup[0]] = lookup[1].weight.detach()  # [vocab, hidden]: rows as a linear's output columns
    exact = num_parameters <= EXACT_MAX_PARAMETERS
    acc: dict[str, list[Any]] = {
        n: [torch.zeros(w.shape[1], dtype=torch.float64), torch.zeros(w.shape[0], dtype=torch.float64),
            torch.zeros(w.shape[1], w.shape[0]) if exact else None, None]
        for n, w in weights.items()
    }
    hooks = []
    for name, mod in linears.items():
        hooks.append(mod.register_forward_hook(_forward_hook(acc[name])))
        hooks.append(mod.register_full_backward_hook(_backward_hook(acc[name])))
    gen = torch.Generator().manual_seed(seed)
    tokens = 0
    try:
        for i, w in enumerate(_pieces(windows, big=dtype != torch.float32)):
            ids = torch.as_tensor(w).reshape(1, -1)
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, use_cache=False).logits.float()[0]
            logp = torch.log_softmax(logits, dim=-1)
            labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)  # y ~ p: the true Fisher
            logp.gather(1, labels).sum().backward()
            if lookup is not None:
                _embedding_grads(acc[lookup[0]], ids[0], emb.grad[0])
            tokens += ids.shape[1]
            if progress:
                progress(f"calib-stats: gradients of window {i + 1}")
    finally:
        for h in hooks:
            h.remove()
    t = max(tokens, 1)
    stats: FisherStats = {n: ((a / t).numpy(), (b / t).numpy(), None if f is None else (f / t).numpy()) for n, (a, b, f, _x) in acc.items()}
    return stats, LinearIndex(weights)


def _linear_weights(model: Any) -> dict[str, Any]:
    """Every matrix-multiplying layer's weight as [out, in]: ``nn.Linear`` and GPT-2's ``Conv1D``
    (transformers.pytorch_utils; its weight is stored [in, out])."""
    import torch

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[name] = mod.weight.detach()
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
            out[name] = mod.weight.detach().T
    return out


def _untied_embedding(model: Any, linears: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(name, module) of the input embedding when no linear shares its weight (an untied model)."""
    emb = model.get_input_embeddings()
    if emb is None or any(w.data_ptr() == emb.weight.data_ptr() for w in linears.values()):
        return None
    return next(n for n, m in model.named_modules() if m is emb), emb


def _embedding_grads(slot: list[Any], ids: Any, grad: Any) -> None:
    """One window's Fisher of the input embedding from the gradient at its output ``grad`` [T, hidden]:
    a += g^2 per hidden channel, b += how often each row was read, F[h, v] += g^2 of the tokens v."""
    import torch

    g2 = grad.detach().double().square()
    slot[0] += g2.sum(0)
    slot[1] += torch.bincount(ids, minlength=slot[1].shape[0]).double()
    if slot[2] is not None:
        slot[2].index_add_(1, ids, g2.T.float())


def _pieces(windows: Iterable[np.ndarray], *, big: bool) -> Iterator[np.ndarray]:
    """The windows, each cut in pieces of ``_BIG_PIECE`` tokens for a large model: the backward pass
    keeps every layer's activations: on Granite-2B (5 GB of bf16 weights) one 512-token window
    peaked at 8.2 GB, in 128-token pieces at 6.6 GB."""
    for w in windows:
        w = np.asarray(w, dtype=np.int64).reshape(-1)
        step = _BIG_PIECE if big else len(w)
        yield from (w[i:i + step] for i in range(0, len(w), max(step, 1)))


def _forward_hook(slot: list[Any]) -> Callable[..., None]:
    def hook(_mod: Any, inputs: tuple[Any, ...], _out: Any) -> None:
        x = inputs[0].detach().double()
        x2 = x.reshape(-1, x.shape[-1]).square()
        slot[0] += x2.sum(0)
        if slot[2] is not None:
            slot[3] = x2.float()

    return hook


def _backward_hook(slot: list[Any]) -> Callable[..., None]:
    def hook(_mod: Any, _grad_in: Any, grad_out: tuple[Any, ...]) -> None:
        g = grad_out[0].detach().double()
        g2 = g.reshape(-1, g.shape[-1]).square()
        slot[1] += g2.sum(0)
        if slot[2] is not None:
            slot[2] += slot[3].T @ g2.float()
            slot[3] = None

    return hook


Part = tuple[str, int, int]  # a linear's name, its first output column, how many columns


class LinearIndex:
    """The checkpoint's linears, findable by the leading values of an output column (in bf16
    precision, which a bf16 checkpoint and its fp32 export share). Each linear is indexed at its
    first column and at its middle one: exports fuse linears side by side (q|k|v) or split one in
    halves (Phi-3's gate_up into gate and up). A match is confirmed on a few whole columns kept
    per linear (first, last, and both sides of the middle), not on the whole weight."""

    def __init__(self, weights: Mapping[str, Any]):
        self._index: dict[tuple[int, ...], list[tuple[str, int]]] = {}
        self._shape: dict[str, tuple[int, int]] = {}
        self._probes: dict[str, dict[int, np.ndarray]] = {}  # name -> output column -> its weights [in]
        for name, w in weights.items():
            n = int(w.shape[0])
            self._shape[name] = (n, int(w.shape[1]))
            rows = sorted({0, n - 1, max(n // 2 - 1, 0), n // 2})
            self._probes[name] = {r: w[r].float().numpy() for r in rows}
            for off in {0, n // 2} if n % 2 == 0 else {0}:
                self._index.setdefault(_column_key(w[off, :_KEY].float().numpy()), []).append((name, off))

    def split(self, w: np.ndarray) -> list[Part] | None:
        """The column ranges of linears that, side by side, are the ONNX matrix ``w`` [K, N]; None if
        some columns match none."""
        parts: list[Part] = []
        col = 0
        while col < w.shape[1]:
            found = next((p for c in self._index.get(_column_key(w[:_KEY, col]), []) if (p := self._fits(c, w, col))), None)
            if found is None:
                return None
            parts.append(found)
            col += found[2]
        return parts

    def _fits(self, cand: tuple[str, int], w: np.ndarray, col: int) -> Part | None:
        name, off = cand
        rows, k = self._shape[name]
        n = min(rows - off, w.shape[1] - col)
        if k != w.shape[0]:
            return None
        probes = [(r, v) for r, v in self._probes[name].items() if off <= r < off + n]
        same = all(np.allclose(w[:, col + r - off], v, rtol=1e-2, atol=1e-6) for r, v in probes)
        return (name, off, n) if same else None


def fisher_pair(stats: FisherStats, parts: list[Part]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(a, b, F) of an ONNX matrix made of the linears' column ranges ``parts`` (they share the input)."""
    a = stats[parts[0][0]][0]
    b = np.concatenate([stats[name][1][off:off + n] for name, off, n in parts])
    fs = [stats[name][2] for name, _o, _n in parts]
    full = None if any(f is None for f in fs) else np.concatenate([f[:, off:off + n] for f, (_name, off, n) in zip(fs, parts, strict=True)], axis=1)  # type: ignore[index]
    return a, b, full


def _column_key(col: np.ndarray) -> tuple[int, ...]:
    bits = np.asarray(col, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return tuple(int(v) for v in (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)  # round to nearest even bf16
