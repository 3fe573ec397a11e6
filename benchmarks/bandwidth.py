"""This machine's memory read bandwidth: the yardstick for "decode at N % of read bandwidth".

A decode step reads every weight once, so tokens/s x bytes read per token cannot exceed what the
cores can stream from memory. This measures that rate with a small C program (OpenMP, the thread
count the engines use), summing a buffer of 64-bit integers two ways and keeping the faster:

* ``sum``: the plain loop the compiler vectorises (``-O3 -march=native``). On the AVX-512 Xeon of
  benchmarks/RESULTS.md it reads ~9 % slower than the kernel below (24.5-26.7 vs 26.9-29.5 GB/s at
  1 GiB, 2 threads): gcc's single-accumulator loop keeps fewer loads in flight than the core can.
* ``vec4``: explicit 512-bit (or 256-bit) loads into four accumulators, as a tuned GEMV streams.

A yardstick set by the slower loop overstates every "% of bandwidth" figure, so the faster one is
the figure. The buffer must be far larger than the last-level cache: ``--sweep`` prints the rate
against the buffer size, which shows where the cache stops helping (this VM reports a 480 MiB L3,
but 256 MiB and more already read at the DRAM rate; see RESULTS.md).

    python benchmarks/bandwidth.py [--threads 2] [--sweep 32,128,256,512,1024,2048]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as python benchmarks/bandwidth.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.vs_common import compiled  # noqa: E402

BUFFER_MIB = 1024  # 1 GiB: over twice the largest L3 this host reports
METHOD = "C/OpenMP, best of 3 x 10 passes over 1 GiB of uint64, faster of a plain sum and a 4-accumulator vector loop"

BW_C = r"""
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
/* usage: bwread MIB REPS KERNEL (sum | vec4); prints GB/s (best pass) and the thread count */
static uint64_t sum_plain(const uint64_t *a, size_t n) {
    uint64_t s = 0;
    #pragma omp parallel for schedule(static) reduction(+:s)
    for (size_t i = 0; i < n; i++) s += a[i];
    return s;
}
static uint64_t sum_vec4(const uint64_t *a, size_t n) {
    uint64_t s = 0;
    #pragma omp parallel reduction(+:s)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        size_t lo = n / nt * t, hi = t == nt - 1 ? n : n / nt * (t + 1), i = lo;
#if defined(__AVX512F__)
        __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
        for (; i + 32 <= hi; i += 32) {
            s0 = _mm512_add_epi64(s0, _mm512_load_si512(a + i));
            s1 = _mm512_add_epi64(s1, _mm512_load_si512(a + i + 8));
            s2 = _mm512_add_epi64(s2, _mm512_load_si512(a + i + 16));
            s3 = _mm512_add_epi64(s3, _mm512_load_si512(a + i + 24));
        }
        s += _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
#elif defined(__AVX2__)
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        for (; i + 16 <= hi; i += 16) {
            s0 = _mm256_add_epi64(s0, _mm256_load_si256((const __m256i *)(a + i)));
            s1 = _mm256_add_epi64(s1, _mm256_load_si256((const __m256i *)(a + i + 4)));
            s2 = _mm256_add_epi64(s2, _mm256_load_si256((const __m256i *)(a + i + 8)));
            s3 = _mm256_add_epi64(s3, _mm256_load_si256((const __m256i *)(a + i + 12)));
        }
        uint64_t v[4];
        _mm256_storeu_si256((__m256i *)v, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
        s += v[0] + v[1] + v[2] + v[3];
#endif
        for (; i < hi; i++) s += a[i];
    }
    return s;
}
int main(int argc, char **argv) {
    size_t n = (size_t)atol(argv[1]) << 17;  /* MiB -> uint64 count */
    int reps = atoi(argv[2]), vec = strcmp(argv[3], "vec4") == 0;
    uint64_t *a = aligned_alloc(64, n * sizeof(uint64_t));
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = i;
    double best = 1e30; uint64_t sink = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = omp_get_wtime();
        sink += vec ? sum_vec4(a, n) : sum_plain(a, n);
        double dt = omp_get_wtime() - t0;
        if (dt < best) best = dt;
    }
    printf("%.3f %llu %d\n", n * sizeof(uint64_t) / best / 1e9, (unsigned long long)(sink & 1), omp_get_max_threads());
    return 0;
}
"""


def _exe(work: Path) -> Path:
    return compiled(BW_C, work, "bwread", ["-O3", "-march=native", "-fopenmp"], cc="gcc")


def measure(work: Path, threads: int, mib: int = BUFFER_MIB, kernel: str = "vec4", reps: int = 10) -> float:
    """GB/s of the best of ``reps`` passes over ``mib`` MiB with ``kernel`` (``sum`` or ``vec4``)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="close")
    out = subprocess.run([str(_exe(work)), str(mib), str(reps), kernel], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[0])


def read_bandwidth_gbs(work: Path, threads: int) -> dict[str, Any]:
    """The yardstick: the best of three runs of each kernel over 1 GiB."""
    by_kernel = {k: max(measure(work, threads, kernel=k) for _ in range(3)) for k in ("sum", "vec4")}
    return {"read_gbs": max(by_kernel.values()), "by_kernel": by_kernel, "threads": threads, "method": METHOD}


# GroupQueryAttention's inputs 7 and 8: the rotary cos / sin tables, [max positions, head_size / 2];
# a step reads the rows of its positions only
GQA_ROW_INPUTS = (7, 8)


def _per_row(op: str, i: int) -> bool:
    """Is input ``i`` of an ``op`` node a table a decode step reads one row of?"""
    return (op.startswith("Gather") and i == 0) or (op == "GroupQueryAttention" and i in GQA_ROW_INPUTS)


def onnx_read_bytes(art: Path) -> dict[str, Any]:
    """Initializer bytes of an artifact, and those a decode step reads: tables read one row per
    token are left out (the data input of a Gather / GatherBlockQuantized, and GroupQueryAttention's
    rotary cos/sin caches: 33.5 MB of Llama-3.2-1B's 131072-position table, which the count
    included until 2026-12-07 and so overstated "% of read bandwidth" by 4 %)."""
    import numpy as np
    import onnx

    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    sizes: dict[str, int] = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data) or int(np.prod(t.dims) * 4)
    uses: dict[str, list[tuple[str, int]]] = {}
    # an untied embedding's own quantized table reaches GatherBlockQuantized through a Reshape (a view)
    views = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Reshape" and n.input[0] in sizes}
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in sizes and not (node.op_type == "Reshape" and i == 0):
                uses.setdefault(name, []).append((node.op_type, i))
            elif name in views:
                uses.setdefault(views[name], []).append((node.op_type, i))
    skip = {n for n, u in uses.items() if u and all(_per_row(op, i) for op, i in u)}
    # a GatherBlockQuantized table's scales/zero points go with it
    for node in m.graph.node:
        if node.op_type == "GatherBlockQuantized":
            for name in node.input[2:]:
                if name in sizes and all(op == "GatherBlockQuantized" for op, _ in uses.get(name, [])):
                    skip.add(name)
    total = sum(sizes.values())
    return {
        "tensor_bytes": total,
        "read_bytes_per_token": total - sum(sizes[n] for n in skip),
        "gather_only": sorted(skip),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", default="", help="buffer sizes in MiB: print GB/s per size and kernel")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "edgepipe-bandwidth")
    args = ap.parse_args(argv)
    print(f"load average {os.getloadavg()}", flush=True)
    if args.sweep:
        print(f"\n| buffer MiB | sum GB/s | vec4 GB/s |  ({args.threads} threads, best of 10 passes)\n|---:|---:|---:|")
        for mib in (int(x) for x in args.sweep.split(",")):
            print(f"| {mib} | {measure(args.work, args.threads, mib, 'sum'):.1f} | {measure(args.work, args.threads, mib, 'vec4'):.1f} |", flush=True)
    r = read_bandwidth_gbs(args.work, args.threads)
    print(f"\nread bandwidth {r['read_gbs']:.2f} GB/s ({', '.join(f'{k} {v:.2f}' for k, v in r['by_kernel'].items())}); {METHOD}")
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
