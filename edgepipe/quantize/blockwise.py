"""Block-wise weight quantization in numpy, in the layout of onnxruntime's MatMulNBits.

A MatMul weight ``B`` [K, N] is quantized in blocks of ``block_size`` along K, one scale and
one integer zero point per (column n, block b): ``w ~= scale * (q - zp)``. The packed data is
[N, n_blocks, block_size * bits / 8] uint8 (low nibble first for 4 bits), scales [N * n_blocks],
zero points [N * ceil(n_blocks * bits / 8)] uint8 — the same tensor serves GatherBlockQuantized
for a tied embedding table (rows = vocabulary, blocks along the hidden size).

Algorithms:
- ``rtn``: round to nearest on the block's min/max (symmetric: absmax, as llama.cpp Q4_0).
- ``mse``: search the clipping range per block that minimises the squared error, then refit the
  scale by least squares; ``importance`` (per-K weights, e.g. the mean square of the activations
  that multiply each input channel, as llama.cpp's imatrix) turns it into a weighted error, which is
  what ``imatrix`` means here. Everything is vectorised over all blocks of a matrix at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


@dataclass(frozen=True)
class QuantizedBlocks:
    """Packed MatMulNBits tensors for a weight of logical shape [K, N] (K padded to blocks)."""

    data: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 packed [N, ceil(n_blocks*bits/8)], None if symmetric
    bits: int
    block_size: int
    K: int
    N: int

    def dequantize(self) -> np.ndarray:
        """Back to float [K, N] (for tests and error measurement)."""
        q = unpack(self.data.reshape(self.N, -1), self.bits).reshape(self.N, -1, self.block_size).astype(np.float32)
        nb = q.shape[1]
        if self.zero_points is None:
            zp = np.full((self.N, nb), 1 << (self.bits - 1), dtype=np.float32)
        else:
            zp = unpack(self.zero_points, self.bits)[:, :nb].astype(np.float32)
        w = (q - zp[..., None]) * self.scales[..., None]
        return w.reshape(self.N, -1)[:, : self.K].T


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 values < 2**bits along the last axis (pairs for 4 bits, low nibble first)."""
    if bits == 8:
        return q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), dtype=q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack(p: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return p
    out = np.empty((*p.shape[:-1], p.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def _quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmax: int) -> np.ndarray:
    """The integers of ``w`` (as float32) for per-block ``scale`` / ``zp``, in one new array."""
    inv = np.where(scale != 0, 1.0 / np.where(scale == 0, 1, scale), 0)
    q = np.multiply(w, inv[..., None])
    np.rint(q, out=q)
    q += zp[..., None]
    return np.clip(q, 0, qmax, out=q)


def _rtn(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    qmax = (1 << bits) - 1
    if symmetric:
        # llama.cpp Q4_0 / Q8_0 style: the value of largest magnitude maps to -2**(bits-1)
        idx = np.abs(w).argmax(axis=-1)
        mx = np.take_along_axis(w, idx[..., None], axis=-1)[..., 0]
        scale = mx / -(1 << (bits - 1))
        zp = np.full(scale.shape, 1 << (bits - 1), dtype=np.float32)
        return scale.astype(np.float32), zp
    lo = np.minimum(w.min(axis=-1), 0)
    hi = np.maximum(w.max(axis=-1), 0)
    scale = (hi - lo) / qmax
    zp = np.clip(np.rint(-lo / np.where(scale == 0, 1, scale)), 0, qmax)
    return scale.astype(np.float32), zp.astype(np.float32)


def _mse(w: np.ndarray, imp: np.ndarray, bits: int, symmetric: bool, steps: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Weighted-MSE search over shrunk clipping ranges, then a least-squares scale refit.

    In torch when it is installed (the build toolchain has it): the same arithmetic, run on all
    cores and in row chunks that stay in cache. numpy's element-wise ops are single-threaded and
    stream every full-matrix temporary through memory; for Granite-2B's [8192, 2048] matrices the
    numpy search was 54 % of a GPTQ matrix's time (profile, loaded machine).
    """
    try:
        import torch
    except ImportError:
        return _mse_numpy(w, imp, bits, symmetric, steps)
    return _mse_torch(torch, w, imp, bits, symmetric, steps)


def _mse_torch(torch, w: np.ndarray, imp: np.ndarray, bits: int, symmetric: bool, steps: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """``_mse_numpy``'s search, with each candidate's error expanded instead of materialised.

    For integers d = q - z the weighted error is sum(imp*w^2) - 2*s*sum(imp*w*d) + s^2*sum(imp*d^2),
    so the least-squares refit and the error need the same two dot products and no residual
    tensor; the quantization runs in place in one scratch buffer. The reductions are float64
    (the expansion subtracts nearly equal terms).
    """
    qmax = (1 << bits) - 1
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows = max(1, (1 << 18) // max(1, w[0].size))  # ~1 MB of weights per chunk: stays in L2
    out_s = np.empty(w.shape[:-1], dtype=np.float32)
    out_z = np.empty(w.shape[:-1], dtype=np.float32)
    ti_all = torch.from_numpy(np.ascontiguousarray(imp, dtype=np.float32))
    shrinks = [float(x) for x in np.linspace(1.0, 0.55, steps)]
    with torch.no_grad():
        for r0 in range(0, w.shape[0], rows):
            t = torch.from_numpy(w[r0 : r0 + rows])
            ti = ti_all if ti_all.shape[0] == 1 else ti_all[r0 : r0 + rows]
            tw = t * ti
            c = (tw * t).sum(-1, dtype=torch.float64)
            buf = _Chunk(t, ti, tw, c, torch.empty_like(t), torch.empty_like(t))
            s0, z0 = (torch.from_numpy(a) for a in _rtn(w[r0 : r0 + rows], bits, symmetric))
            best_s, best_z, best_err = s0, z0, _torch_err(torch, buf, s0, z0, qmax)
            lo0 = torch.clamp(t.amin(-1), max=0)
            hi0 = torch.clamp(t.amax(-1), min=0)
            for shrink in shrinks:
                if symmetric:
                    s, z = s0 * shrink, z0
                else:
                    lo, hi = lo0 * shrink, hi0 * shrink
                    s = (hi - lo) / qmax
                    z = torch.clamp(torch.round(-lo / torch.where(s == 0, torch.ones_like(s), s)), 0, qmax)
                n, m = _torch_dots(torch, buf, s, z, qmax)  # least-squares refit of the scale for these integers
                s = torch.where(m > 0, (n / torch.where(m == 0, torch.ones_like(m), m)).float(), s)
                e_s = _torch_err(torch, buf, s, z, qmax)
                better = e_s < best_err
                best_err = torch.where(better, e_s, best_err)
                best_s = torch.where(better, s, best_s)
                best_z = torch.where(better, z, best_z)
            out_s[r0 : r0 + rows] = best_s.numpy()
            out_z[r0 : r0 + rows] = best_z.numpy()
    return out_s, out_z


class _Chunk(NamedTuple):
    """One row chunk of ``_mse_torch``: weights, importance, their product, sum(imp*w^2), scratch."""

    w: Any
    imp: Any
    imp_w: Any
    imp_w2: Any  # float64 per block
    d: Any  # scratch: q - z
    imp_d: Any  # scratch: imp * d


def _torch_dots(torch, buf: _Chunk, s, z, qmax: int):  # type: ignore[no-untyped-def]
    """sum(imp*w*d) and sum(imp*d*d) per block for d = quantize(w; s, z) - z, in float64."""
    d, e = buf.d, buf.imp_d
    one = torch.ones_like(s)
    inv = torch.where(s != 0, one / torch.where(s == 0, one, s), torch.zeros_like(s))
    torch.mul(buf.w, inv[..., None], out=d)
    d.round_().add_(z[..., None]).clamp_(0, qmax).sub_(z[..., None])
    torch.mul(buf.imp, d, out=e)
    return torch.linalg.vecdot(buf.imp_w, d).double(), torch.linalg.vecdot(e, d).double()


def _torch_err(torch, buf, s, z, qmax: int):  # type: ignore[no-untyped-def]
    """Weighted squared error per block: sum(imp*w^2) - 2*s*sum(imp*w*d) + s^2*sum(imp*d^2)."""
    n, m = _torch_dots(torch, buf, s, z, qmax)
    s64 = s.double()
    return buf.imp_w2 - 2 * s64 * n + s64 * s64 * m


def _mse_numpy(w: np.ndarray, imp: np.ndarray, bits: int, symmetric: bool, steps: int = 12) -> tuple[np.ndarray, np.ndarray]:
    qmax = (1 << bits) - 1
    s0, z0 = best_s, best_z = _rtn(w, bits, symmetric)
    best_err = _err(w, imp, best_s, best_z, qmax)
    lo0 = np.minimum(w.min(axis=-1), 0)
    hi0 = np.maximum(w.max(axis=-1), 0)
    for shrink in np.linspace(1.0, 0.55, steps):
        if symmetric:
            s, z = s0 * shrink, z0
        else:
            lo, hi = lo0 * shrink, hi0 * shrink
            s = ((hi - lo) / qmax).astype(np.float32)
            z = np.clip(np.rint(-lo / np.where(s == 0, 1, s)), 0, qmax).astype(np.float32)
        q = _quantize(w, s, z, qmax)
        # least-squares refit of the scale for the chosen integers: min sum imp*(w - s*(q-z))^2
        d = q - z[..., None]
        num = (imp * w * d).sum(-1)
        den = (imp * d * d).sum(-1)
        s = np.where(den > 0, num / np.where(den == 0, 1, den), s).astype(np.float32)
        err = _err(w, imp, s, z, qmax)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s, best_z


def _err(w: np.ndarray, imp: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: int) -> np.ndarray:
    q = _quantize(w, s, z, qmax)
    r = w - (q - z[..., None]) * s[..., None]
    return (imp * r * r).sum(-1)


def rtn_squared_error(wt: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """Round-to-nearest's squared error per weight of ``wt`` [N, K] (a weight's transpose: blocks run
    along rows), the arithmetic of ``quantize_matrix(..., algorithm="rtn")`` then ``dequantize``
    without packing, in place in one scratch array. Why: the size allocator scores every matrix in
    every allowed format, and the packed round trip (pack, unpack, a strided transpose, float64
    temporaries) made that pass several minutes per format on Granite-2B's matrices."""
    N, K = wt.shape
    nb = -(-K // block_size)
    qmax = (1 << bits) - 1
    if K % block_size:
        w = np.zeros((N, nb * block_size), dtype=np.float32)
        w[:, :K] = wt
    else:
        w = np.asarray(wt, dtype=np.float32)
    w = w.reshape(N, nb, block_size)
    scale, zp = _rtn(w, bits, symmetric)
    d = _quantize(w, scale, zp, qmax)
    d -= zp[..., None]
    d *= scale[..., None]
    np.subtract(w, d, out=d)
    np.square(d, out=d)
    return d.reshape(N, -1)[:, :K]


def quantize_matrix(
    weight: np.ndarray,
    *,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = False,
    algorithm: str = "rtn",
    importance: np.ndarray | None = None,
    steps: int = 12,
) -> QuantizedBlocks:
    """Quantize a MatMul weight ``weight`` [K, N] block-wise along K (``steps``: clipping ranges the search tries)."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K, N = weight.shape
    nb = -(-K // block_size)
    w = np.zeros((N, nb * block_size), dtype=np.float32)
    w[:, :K] = weight.T
    w = w.reshape(N, nb, block_size)
    if importance is None:
        imp = np.ones((1, nb, block_size), dtype=np.float32)
    else:
        imp = np.zeros(nb * block_size, dtype=np.float32)
        imp[:K] = np.maximum(importance.astype(np.float32), 1e-12)
        imp = imp.reshape(1, nb, block_size)
    if algorithm == "rtn":
        scale, zp = _rtn(w, bits, symmetric)
    elif algorithm in ("mse", "imatrix"):
        scale, zp = _mse(w, imp, bits, symmetric, steps)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    qmax = (1 << bits) - 1
    q = _quantize(w, scale, zp, qmax).astype(np.uint8)
    data = pack(q.reshape(N, nb, block_size), bits)
    zps = None if symmetric else pack(zp.astype(np.uint8), bits)
    return QuantizedBlocks(data, scale.astype(np.float32), zps, bits, block_size, K, N)
