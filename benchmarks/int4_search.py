"""Search for the Raspberry Pi int4 configuration: quality vs size on the default model.

Reruns the comparison behind the Pi profiles' quantization (issue 2: "an int4 configuration at
least as good as Q4_K_M at no larger size, found by measurement"). Every variant is quantized from
edgepipe's fp32 export with :func:`edgepipe.quantize.quantize` and scored as ``edgepipe build``
scores it (``edgepipe/data/eval.txt``, 13 windows x 512 tokens, second half of each window scored,
exact KL against the fp32 export), so the figures are the ones a build's manifest reports.

What makes it cheap enough to try many allocations on 2 shared cores:
- the calibration Hessians are computed once and kept in ``--work`` (npz);
- each matrix's quantized blocks are kept on disk (:class:`edgepipe.quantize.WeightCache`, keyed by
  the weight, its config and the statistics the config reads): GPTQ of a matrix does not depend on
  how the other matrices are quantized, so a new 8-bit allocation only re-packs the graph. The cache
  holds what the real quantizers returned; nothing is faked.
- the fp32 reference logits are computed once per process.

    python benchmarks/int4_search.py                    # the decisive comparison (table on stdout)
    python benchmarks/int4_search.py --variants a,b     # a subset (names: --list)

Scratch data (~1 GB) lives in ``--work`` (default ``$EDGEPIPE_CACHE/int4_search``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

import edgepipe

if not __package__:  # run as python benchmarks/int4_search.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.residual import residual_mean_squares
from benchmarks.search_common import Scorer, artifact_bytes, log, profile_record, run_variant, scheme_of

Q4_K_M = {
    "name": "llama.cpp Q4_K_M",
    "bytes": 105_454_048,
    "ppl_increase_pct": 4.047,
    "kl_divergence": 0.0461,
    "top1_agreement": 0.862,
}

Q4_0_BYTES = 91_726_816  # llama.cpp Q4_0 of the default model (vs_llamacpp.py); issue 6's size goal is 1.05x this

BASE = dict(
    bits=4,
    block_size=32,
    symmetric=False,
    accuracy_level=4,
    algorithm="gptq",
    embedding_bits=8,
    embedding_block_size=128,
)
# the Pi profiles before this search, as they were applied: "down_proj@first:4,last:4", "qkv_proj@first:2,last:2"
# with "last" counted from a layer index one too high (the builder names the final norm layers.30)
PROFILE_OPS = ("down_proj@0-3,27-29", "qkv_proj@0-1,29")



def fp32_export() -> Path:
    """The fp32 export of the default model: the build's export stage (cached; exported if missing)."""
    from edgepipe.export.stage import ExportConfig, run_export
    from edgepipe.models import default_model_dir
    from edgepipe.stage import StageContext

    info = edgepipe.inspect_model(default_model_dir(log))
    return run_export(info, ExportConfig.for_model(info), StageContext(progress=log)).model_dir


def windows(model_dir: Path):
    """The calibration and eval token windows (the packaged texts). Calibration keeps the 8 windows this
    search was run with (session 2), not the 24 a build of this model now reads (``calib_window_count``)."""
    from edgepipe.texts import CALIB_WINDOWS, EVAL_WINDOWS, read_text_file, token_windows

    tok = model_dir / "tokenizer.json"
    calib = read_text_file(None, "calib.txt", "calibration")
    evalt = read_text_file(None, "eval.txt", "eval")
    return token_windows(tok, calib, CALIB_WINDOWS, "calibration"), token_windows(tok, evalt, EVAL_WINDOWS, "eval")


def importance(model_dir: Path, calib, work: Path) -> dict[str, np.ndarray]:
    path = work / "importance.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from edgepipe.quantize.calibrate import collect_importance

    log("calibrating (Hessians), once")
    imp = collect_importance(model_dir, calib, hessians=True)
    np.savez(path, **{k: v.astype(np.float32) for k, v in imp.items()})
    return imp



def sensitivities(fp32: Path, imp, cfg_kw: dict, work: Path, cache) -> list[dict]:
    """Per transformer matrix: Hessian-weighted output error tr(dW^T H dW) at 4 and 8 bits, and bytes."""
    f = work / f"sens-b{cfg_kw['block_size']}-{'sym' if cfg_kw['symmetric'] else 'asym'}.json"
    if f.exists():
        return json.loads(f.read_text())
    import onnx
    from onnx import numpy_helper

    from edgepipe.quantize import Gptq, Rtn
    from edgepipe.quantize.handlers import WeightStats, quantize_weight

    # 4 bits: GPTQ with the layer's Hessian; 8 bits: round to nearest (its error is small either way)
    configs = {
        4: Gptq(bits=4, block_size=cfg_kw["block_size"], symmetric=cfg_kw["symmetric"]),
        8: Rtn(bits=8, block_size=cfg_kw["block_size"], symmetric=cfg_kw["symmetric"]),
    }

    model = onnx.load(str(fp32 / "model.onnx"), load_external_data=False)
    rows = []
    for t in model.graph.initializer:
        if ".layers." not in t.name or not t.name.endswith("MatMul.weight"):
            continue
        w = numpy_helper.to_array(t, base_dir=str(fp32))
        H = imp[f"{t.name}@H"].astype(np.float64)
        r = {
            "name": t.name,
            "layer": int(t.name.split(".layers.")[1].split(".")[0]),
            "op": t.name.split(".")[-3],
        }
        for bits, qcfg in configs.items():
            qb = quantize_weight(qcfg, w, WeightStats(imp, t.name), cache=cache)
            d = (w - qb.dequantize()).astype(np.float64)
            r[f"err{bits}"] = float((d * (H @ d)).sum())
            r[f"bytes{bits}"] = int(
                qb.data.nbytes + qb.scales.nbytes + (0 if qb.zero_points is None else qb.zero_points.nbytes)
            )
        rows.append(r)
        log(f"sensitivity {t.name}: err4 {r['err4']:.4g} err8 {r['err8']:.4g}")
    f.write_text(json.dumps(rows, indent=0))
    return rows


def bytes8(r: dict, block: int | None) -> int:
    """Bytes of a matrix at 8 bits, asymmetric, in blocks of ``block`` (None: as measured)."""
    from edgepipe.quantize import Format

    if block is None:
        return r["bytes8"]
    K, N = r["shape"]
    return Format(8, block, symmetric=False).nbytes(K, N)


def greedy_ops(
    rows: list[dict], extra_bytes: int, weight=lambda r: 1.0, block8: int | None = None
) -> tuple[str, ...]:
    """8 bits for the matrices with the largest (weighted) error reduction per extra byte, within budget."""
    order = sorted(
        rows, key=lambda r: -weight(r) * (r["err4"] - r["err8"]) / (bytes8(r, block8) - r["bytes4"])
    )
    chosen: dict[str, list[int]] = {}
    spent = 0
    for r in order:
        cost = bytes8(r, block8) - r["bytes4"]
        if spent + cost <= extra_bytes:
            spent += cost
            chosen.setdefault(r["op"], []).append(r["layer"])
    return tuple(f"{op}@{','.join(str(i) for i in sorted(ls))}" for op, ls in sorted(chosen.items()))


MARGIN = 20_000  # bytes left for the graph's own growth (one node attribute set per 8-bit matrix)


def kl_weight(ctx, r: dict) -> float:
    """Turns the greedy's error reduction into the measured KL of the matrix alone at int4."""
    return ctx.measured_kl(BASE)[r["name"]] / (r["err4"] - r["err8"])


def variants(ctx) -> dict[str, Callable]:
    """name -> function(ctx) returning a profile's quantization fields (some need measured figures)."""
    def greedy(weight=lambda ctx, r: 1.0, budget=Q4_K_M["bytes"], **over):
        def make(ctx):
            kw = dict(BASE, **over)
            base = ctx.bytes_of(dict(kw, eight_bit_ops=()))
            ops = greedy_ops(
                ctx.rows(kw),
                budget - base - MARGIN,
                lambda r: weight(ctx, r),
                kw.get("eight_bit_block_size"),
            )
            return dict(kw, eight_bit_ops=ops)

        return make

    return {
        "previous-profile": lambda ctx: dict(BASE, eight_bit_ops=PROFILE_OPS),
        "int4-only": lambda ctx: dict(BASE),
        "hessian-greedy": greedy(),
        "hessian-greedy-emb4": greedy(embedding_bits=4, embedding_block_size=None),
        "hessian-greedy-resid": greedy(weight=lambda ctx, r: 1.0 / ctx.residual_ms()[r["name"]]),
        # gain = measured KL of the matrix alone at int4 (err8 ~ 0): weight = dKL / (err4 - err8)
        "kl-greedy": greedy(weight=kl_weight),
        "kl-greedy-8bit-block64": greedy(weight=kl_weight, eight_bit_block_size=64),
        "kl-greedy-emb4": greedy(weight=kl_weight, embedding_bits=4, embedding_block_size=None),
        "kl-greedy-emb4-8bit-block64": greedy(
            weight=kl_weight, embedding_bits=4, embedding_block_size=None, eight_bit_block_size=64
        ),
        # int4 block size: fewer scale/zero-point bytes per weight (5.125 bits at 32, 4.56 at 64, 4.28 at
        # 128), faster MatMulNBits, coarser int4; the bytes saved buy more 8-bit matrices at the same size
        "kl-greedy-emb4-8bit-block64-int4-block64": greedy(
            weight=kl_weight, embedding_bits=4, embedding_block_size=None, eight_bit_block_size=64, block_size=64
        ),
        # (int4 block 128 cannot be GPTQ'd here: SmolLM2's hidden size 576 is not a multiple of 128)
        # the best quality within issue 6's size goal (1.05x Q4_0's file)
        "q4_0-size-int4-block32": greedy(
            weight=kl_weight, budget=int(Q4_0_BYTES * 1.05), embedding_bits=4, embedding_block_size=None, eight_bit_block_size=64
        ),
        "raspberrypi5": lambda ctx: profile_record(dataclasses.asdict(edgepipe.load_target("raspberrypi5").quantization)),
    }


class Context:
    def __init__(self, fp32, imp, scorer, work, cache):
        self.fp32, self.imp, self.scorer, self.work, self.cache = fp32, imp, scorer, work, cache
        self.results: dict[str, dict] = {}

    def residual_ms(self) -> dict[str, float]:
        """Per weight: mean square of the residual stream its output joins (calibration windows)."""
        f = self.work / "residual_ms.json"
        if not f.exists():
            f.write_text(json.dumps(residual_mean_squares(self.fp32, windows(self.fp32)[0])))
        return json.loads(f.read_text())

    def measured_kl(self, kw, tokens: int = 128, nwin: int = 1) -> dict[str, float]:
        """Per transformer matrix: KL(fp32 || model with only that matrix at int4), measured.

        In torch on the HF checkpoint (a forward pass is ~10x cheaper than re-packing an ONNX
        graph), on ``nwin`` calibration windows of ``tokens`` tokens, all positions scored. The int4
        weights are exactly the ones the quantizer writes (the same cached GPTQ call).
        """
        f = self.work / f"kl-b{kw['block_size']}-{'sym' if kw['symmetric'] else 'asym'}-{tokens}x{nwin}.json"
        if f.exists():
            return json.loads(f.read_text())
        import onnx
        import torch
        from onnx import numpy_helper
        from transformers import AutoModelForCausalLM

        from edgepipe.models import default_model_dir
        from edgepipe.quantize import Gptq
        from edgepipe.quantize.handlers import WeightStats, quantize_weight

        torch.set_num_threads(2)
        hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32).eval()
        params = dict(hf.named_parameters())
        model = onnx.load(str(self.fp32 / "model.onnx"), load_external_data=False)
        wins = torch.tensor(np.stack([w[:tokens] for w in windows(self.fp32)[0][:nwin]]))

        def logp():
            with torch.no_grad():
                return torch.log_softmax(hf(wins).logits.double(), -1)

        ref = logp()
        part = f.with_suffix(".partial.json")
        out = json.loads(part.read_text()) if part.exists() else {}
        for t in model.graph.initializer:
            if ".layers." not in t.name or not t.name.endswith("MatMul.weight") or t.name in out:
                continue
            w = numpy_helper.to_array(t, base_dir=str(self.fp32))
            layer, op = t.name.split(".layers.")[1].split(".")[0], t.name.split(".")[-3]
            pre = f"model.layers.{layer}.{'self_attn' if op in ('qkv_proj', 'o_proj') else 'mlp'}."
            names = [pre + p for p in ("q_proj", "k_proj", "v_proj")] if op == "qkv_proj" else [pre + op]
            ps = [params[n + ".weight"] for n in names]
            orig = torch.cat([p.data for p in ps], 0)
            if not np.allclose(orig.numpy().T, w, atol=1e-6):
                raise RuntimeError(f"{t.name} does not match the HF weights {names}")
            gptq = Gptq(bits=kw["bits"], block_size=kw["block_size"], symmetric=kw["symmetric"])
            qb = quantize_weight(gptq, w, WeightStats(self.imp, t.name), cache=self.cache)
            deq = torch.from_numpy(np.ascontiguousarray(qb.dequantize().T.astype(np.float32)))
            off = 0
            for p in ps:
                p.data = deq[off : off + p.shape[0]].clone()
                off += p.shape[0]
            lp = logp()
            out[t.name] = float((ref.exp() * (ref - lp)).sum(-1).mean())
            off = 0
            for p in ps:
                p.data = orig[off : off + p.shape[0]].clone()
                off += p.shape[0]
            log(f"KL {t.name}: {out[t.name]:.5f}")
            part.write_text(json.dumps(out))
        f.write_text(json.dumps(out, indent=0))
        return out

    def rows(self, kw):
        import onnx

        dims = {
            t.name: list(t.dims)
            for t in onnx.load(str(self.fp32 / "model.onnx"), load_external_data=False).graph.initializer
        }
        return [dict(r, shape=dims[r["name"]]) for r in sensitivities(self.fp32, self.imp, kw, self.work, self.cache)]

    def bytes_of(self, kw) -> int:
        """Artifact bytes of a configuration (quantized, not scored)."""
        from edgepipe.quantize import quantize

        f = (
            self.work
            / "sizes"
            / (hashlib.sha1(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:12] + ".json")
        )
        if not f.exists():
            out = self.work / "q" / "size-probe"
            quantize(self.fp32, out, scheme_of(kw), importance=self.imp, weight_cache=self.cache)
            f.parent.mkdir(exist_ok=True)
            f.write_text(json.dumps({"config": kw, "bytes": artifact_bytes(out)}, default=list))
        return json.loads(f.read_text())["bytes"]

    def run(self, name, kw) -> dict:
        if name not in self.results:
            self.results[name] = run_variant(name, kw, self.fp32, self.imp, self.scorer, self.work, self.cache)
        return self.results[name]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    p.add_argument("--list", action="store_true")
    a = p.parse_args(argv)
    vs = variants(None)
    if a.list:
        print("\n".join(vs))
        return 0
    from edgepipe.models import cache_root
    from edgepipe.quantize import WeightCache

    work = a.work or cache_root() / "int4_search"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = fp32_export()
    calib, evalw = windows(fp32)
    imp = importance(fp32, calib, work)
    ctx = Context(fp32, imp, Scorer(fp32, evalw), work, WeightCache(work / "weight-cache"))
    names = a.variants.split(",") if a.variants else list(vs)
    rows = [Q4_K_M]
    for n in names:
        log(f"variant {n}")
        r = ctx.run(n, vs[n](ctx))
        rows.append(r)
        log(
            f"{n}: {r['bytes'] / 1e6:.2f} MB ppl +{r['ppl_increase_pct']:.2f} % KL {r['kl_divergence']:.4f} top1 {r['top1_agreement']:.3f}"
        )
    print("| config | MB (model.onnx + data) | PPL increase | mean KL | same top-1 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['bytes'] / 1e6:.2f} | +{r['ppl_increase_pct']:.2f} % | {r['kl_divergence']:.4f} | {100 * r['top1_agreement']:.1f} % |"
        )
    print()
    for r in rows[1:]:
        c = r["config"]
        print(
            f"- {r['name']}: embedding int{c['embedding_bits']}, matmuls {r['matmuls']}, eight_bit_ops {list(c['eight_bit_ops'])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
