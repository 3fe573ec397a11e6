"""edgepipe's side of ``benchmarks/vs_llamacpp.py``: the artifacts (the targets' own builds, round-to-nearest
and size-budget variants of a profile, reused while current), edgepipe's fp32 export, and the quality of
each artifact on llama-perplexity's exact tokens and scored positions."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bandwidth import onnx_read_bytes
from benchmarks.vs_common import Progress, say
from benchmarks.vs_llama_side import CTX, read_kld_base

SIZE_MATCHED = ("Q4_0", "Q4_K_M")  # --match-sizes: edgepipe --max-mb at these files' sizes
# what the matched builds' allocator chooses between (see budget_profile): int4 in blocks of 32, 64 and 128,
# with and without zero points (4.25 to 5.125 bits/weight with fp32 scales), and int8 in blocks of 64
BUDGET_FORMATS = tuple(f"int4/b{b}/{s}" for b in (32, 64, 128) for s in ("sym", "asym")) + ("int8/b64/asym",)
EDGEPIPE_TARGETS = {"x86-avx512": "int8", "raspberrypi5": "int4"}
# which llama.cpp quant each edgepipe artifact is compared with
PAIRS = (("int8", "Q8_0"), ("int4", "Q4_0"), ("int4", "Q4_K_M"), ("int4@Q4_0", "Q4_0"), ("int4@Q4_K_M", "Q4_K_M"))


def CausalLM_has_slice(art: Path) -> bool:
    """Whether the folder's graph has the logits_slice pass's input (see edgepipe.optimize)."""
    import onnx

    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    return any(i.name == "logits_start" for i in m.graph.input)


def rtn_profile(work: Path, target: str = "x86-avx2") -> Path:
    """``target`` (a shipped profile's name) with plain round-to-nearest instead of imatrix / GPTQ and
    without its size budget, so every matrix gets the profile's own ``bits`` / ``block_size`` (``x86-avx2``
    and ``raspberrypi5``: int4 b32 asym, the tied table int4 too; ``x86-avx2`` kept an int8 table until
    2026-12-07), or those of a ``:b128sym`` / ``:b64asym`` suffix. On a random-init model calibration
    statistics and sensitivities mean nothing, and skipping them saves most of the build on a large model.
    Speed does not depend on the rounding."""
    import yaml

    from edgepipe.targets import targets_dir

    target, _, fmt = target.partition(":")
    doc = yaml.safe_load((targets_dir() / f"{target}.yaml").read_text())
    doc["name"] = f"{target}-rtn" + (f"-{fmt}" if fmt else "")
    q = doc["quantization"]
    if fmt:  # e.g. b128sym: every matrix and the table in blocks of 128 without zero points
        m = re.fullmatch(r"b(\d+)(a?sym)", fmt)
        if m is None:
            raise SystemExit(f"error: --int4-target rtn:{target}:{fmt}: the suffix is b<block>sym or b<block>asym")
        q["block_size"], q["symmetric"] = int(m[1]), m[2] == "sym"
    for key in ("bits_per_weight", "max_mb", "formats", "sensitivity", "eight_bit_ops", "eight_bit_layers"):
        q.pop(key, None)
    q["algorithm"] = "rtn"
    text = yaml.safe_dump(doc, sort_keys=False)
    out = work / f"{doc['name']}.yaml"
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    return out


def _code_mtime() -> float:
    """The newest edgepipe source or shipped profile: an artifact older than this is built again."""
    import edgepipe

    pkg = Path(edgepipe.__file__).parent
    return max(f.stat().st_mtime for f in [*pkg.rglob("*.py"), *pkg.parent.glob("targets/*.yaml")])


def _reusable(art: Path, tgt: dict[str, Any], sha: str, reuse_any: bool) -> bool:
    """Whether ``art`` was built from the same model for the same target config (and, unless
    ``reuse_any``, by edgepipe's current code: e.g. its validation protocol may have changed)."""
    mpath = art / "manifest.json"
    if not mpath.is_file():
        return False
    try:
        m = json.loads(mpath.read_text())
    except ValueError:
        return False
    same = m.get("target") == tgt and (m.get("source_model") or {}).get("sha256") == sha
    return same and (reuse_any or mpath.stat().st_mtime > _code_mtime())


def budget_profile(work: Path, target: str, max_mb: float, tag: str) -> Path:
    """``target`` (a shipped profile's name) with a ``max_mb`` budget instead of its own, and the formats
    the allocator chooses between widened to :data:`BUDGET_FORMATS`: the Pi profiles allow int4 block 32
    (asymmetric, 5.125 bits/weight with its fp32 scales and zero points) and int8 block 64 only, and
    nothing reaches Q4_0's 4.5 bits/weight with those. Any expert list (``eight_bit_ops``) is dropped
    too, so the build-time allocator chooses every matrix. The shipped profiles keep their defaults."""
    import yaml

    from edgepipe.targets import targets_dir

    doc = yaml.safe_load((targets_dir() / f"{target}.yaml").read_text())
    doc["name"] = f"{target}-at-{tag}"
    q = doc["quantization"]
    for key in ("eight_bit_ops", "eight_bit_layers", "bits_per_weight"):
        q.pop(key, None)
    q.update(formats=list(BUDGET_FORMATS), max_mb=float(max_mb))
    text = yaml.safe_dump(doc, sort_keys=False)
    out = work / f"{target}-at-{tag}.yaml"
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    return out


def edgepipe_artifacts(
    model_dir: Path,
    work: Path,
    progress: Progress,
    rebuild: bool = False,
    targets: dict[str, str] | None = None,
    reuse_any: bool = False,
    allow_random_weights: bool = False,  # a random-init model (--random): untrained on purpose
    texts: dict[str, Path] | None = None,  # calib / eval_file for edgepipe.build (default: packaged)
) -> dict[str, Path]:
    import edgepipe

    sha = edgepipe.inspect_model(model_dir).sha256
    out: dict[str, Path] = {}
    for target, label in (targets or EDGEPIPE_TARGETS).items():
        art = work / f"edgepipe-{Path(target).stem}"
        tgt = edgepipe.load_target(target).to_dict()
        if not rebuild and _reusable(art, tgt, sha, reuse_any):
            progress(f"edgepipe {target}: reusing {art}")
        else:
            progress(f"edgepipe build --target {target} (stage cache)")
            edgepipe.build(
                model=model_dir, target=target, out=art, progress=lambda s, t=target: progress(f"  {t}: {s}"),
                allow_random_weights=allow_random_weights, **(texts or {}),
            )
        out[label] = art
    return out


def sized_artifacts(
    model_dir: Path, work: Path, progress: Progress, target: str, sizes: dict[str, int],
    texts: dict[str, Path] | None = None, rebuild: bool = False, reuse_any: bool = False,
) -> dict[str, Path]:
    """``target`` built with ``max_mb`` at each llama.cpp file's size (``sizes``: quant -> bytes; the
    profile from :func:`budget_profile`), so that the artifact (model.onnx + data) is no larger;
    labels ``int4@<quant>``. A budget the model cannot reach is reported and skipped."""
    import edgepipe
    from edgepipe.errors import TargetError

    sha = edgepipe.inspect_model(model_dir).sha256
    out: dict[str, Path] = {}
    for quant, nbytes in sizes.items():
        max_mb = nbytes / 2**20
        prof = budget_profile(work, target, max_mb, quant)
        art = work / f"edgepipe-{prof.stem}"
        try:
            if rebuild or not _reusable(art, edgepipe.load_target(str(prof)).to_dict(), sha, reuse_any):
                progress(f"edgepipe build --target {prof} (max_mb {max_mb:.4f}: {quant}'s {nbytes} bytes)")
                edgepipe.build(
                    model=model_dir, target=str(prof), out=art, progress=lambda s, q=quant: progress(f"  at {q}: {s}"), **(texts or {})
                )
        except TargetError as e:  # e.g. below the smallest size the allowed formats reach: say so, go on
            progress(f"edgepipe {prof.stem}: {e}")
            continue
        out[f"int4@{quant}"] = art
    return out


def fp32_export_dir(model_dir: Path, progress: Progress) -> Path:
    """edgepipe's fp32 ONNX export of the model: the build's own export stage (cached, the same entry
    ``edgepipe build`` uses; exported if absent)."""
    import edgepipe
    from edgepipe.export.stage import ExportConfig, run_export
    from edgepipe.stage import StageContext

    info = edgepipe.inspect_model(model_dir)
    return run_export(info, ExportConfig.for_model(info), StageContext(progress=progress)).model_dir


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def edgepipe_quality_matched(
    arts: dict[str, Path], fp32_dir: Path, base_file: Path, threads: int, progress: Progress
) -> dict[str, Any]:
    """edgepipe's models on llama-perplexity's exact tokens and scored positions."""
    from edgepipe.runtime.model import CausalLM

    n_ctx, tokens, llama_lp = read_kld_base(base_file)
    first = n_ctx // 2
    tgt = tokens[:, first + 1 :]  # [chunk, n_pos]
    pos = np.arange(tgt.shape[1])

    def run_model(d: Path) -> list[np.ndarray]:
        lm = CausalLM(d, threads=threads)
        return [
            _log_softmax(lm.logits(tokens[c])[first : n_ctx - 1]).astype(np.float32)
            for c in range(tokens.shape[0])
        ]

    def compare(
        lp_q: list[np.ndarray], lp_ref: list[np.ndarray] | np.ndarray, exact: bool = True
    ) -> dict[str, float]:
        """``kl_divergence`` as llama-perplexity defines it: KL(ref || q) summed over the tokens whose
        reference log-prob is above -16 (its stored log-probs are floored, the tail is left out);
        ``kl_divergence_exact`` over the whole vocabulary (only when the reference is exact)."""
        nll = nll_ref = kl = kl_exact = 0.0
        agree = n = 0
        for c, q in enumerate(lp_q):
            r = np.asarray(lp_ref[c], dtype=np.float64)
            q = q.astype(np.float64)
            nll -= q[pos, tgt[c]].sum()
            nll_ref -= r[pos, tgt[c]].sum()
            terms = np.exp(r) * (r - q)
            kl += float(terms[r > -16.0].sum())
            if exact:
                kl_exact += float(terms.sum())
            agree += int((q.argmax(-1) == r.argmax(-1)).sum())
            n += len(pos)
        ppl, ppl_ref = float(np.exp(nll / n)), float(np.exp(nll_ref / n))
        out = {
            "perplexity": ppl,
            "reference_perplexity": ppl_ref,
            "ppl_increase_pct": 100.0 * (ppl / ppl_ref - 1.0),
            "kl_divergence": kl / n,
            "top1_agreement": agree / n,
            "scored_tokens": n,
        }
        if exact:
            out["kl_divergence_exact"] = kl_exact / n
        return out

    progress(
        f"edgepipe quality on llama-perplexity's tokens: fp32 export ({tokens.shape[0]} chunks of {n_ctx})"
    )
    ref = run_model(fp32_dir)
    res: dict[str, Any] = {"fp32_vs_llama_f32": compare(ref, llama_lp, exact=False)}
    for label, art in arts.items():
        progress(f"edgepipe quality on llama-perplexity's tokens: {label}")
        q = run_model(art)
        res[label] = compare(q, ref)
        res[label]["vs_llama_f32"] = compare(q, llama_lp, exact=False)
    return res


def _eval_protocol(ev: dict[str, Any]) -> str:
    scored = f"scored from position {ev['scored_from_position']}" if "scored_from_position" in ev else "every position"
    return f"{ev.get('windows')}×{ev.get('window_tokens')}, " + scored


def _artifact_facts(ep: dict[str, Any], label: str, art: Path) -> None:
    """One artifact's size, bytes read per token, manifest accuracy, target and eval protocol, into ``ep``."""
    # a prebuilt folder (--artifact) may be a bare model folder without a manifest
    mp = art / "manifest.json"
    m = json.loads(mp.read_text()) if mp.is_file() else {"metrics": {"accuracy": {}}, "target": {"name": "?"}}
    if mp.is_file() and not m.get("optimize") and CausalLM_has_slice(art):
        m["target"]["name"] += " + logits_slice pass"
    ep["files"][label] = {
        "file_bytes": sum(f.stat().st_size for f in art.glob("model.onnx*")),
        **onnx_read_bytes(art),
    }
    ep["manifest_accuracy"][label] = m["metrics"]["accuracy"]
    ep["targets"][label] = m["target"]["name"]
    ep.setdefault("eval", {})[label] = _eval_protocol(m.get("eval") or {})
    ep.setdefault("quantization", {})[label] = m["target"].get("quantization")


def _matched_quality(
    args: argparse.Namespace, arts: dict[str, Path], model_dir: Path, work: Path, threads: int
) -> dict[str, Any]:
    """edgepipe on llama-perplexity's tokens, cached under the base logits' and the artifacts' identity."""
    base_file = work / f"kld-base-c{CTX}.bin"
    qkey = {
        "v": 2,
        "base": base_file.stat().st_mtime_ns if base_file.is_file() else None,
        **{
            k: hashlib.sha256(
                (a / "manifest.json" if (a / "manifest.json").is_file() else a / "model.onnx").read_bytes()
            ).hexdigest()
            for k, a in arts.items()
        },
    }
    qcache = work / "quality-matched.json"
    cached = json.loads(qcache.read_text()) if qcache.is_file() else {}
    if cached.get("key") == qkey:
        say("edgepipe quality on llama-perplexity's tokens: cached")
        return cached["result"]
    if args.no_quality:
        say("edgepipe quality on llama-perplexity's tokens: skipped (--no-quality)")
        return {}
    result = edgepipe_quality_matched(arts, fp32_export_dir(model_dir, say), base_file, threads, say)
    qcache.write_text(json.dumps({"key": qkey, "result": result}, indent=2))
    return result


def edgepipe_results(
    args: argparse.Namespace, arts: dict[str, Path], model_dir: Path, work: Path, threads: int
) -> dict[str, Any]:
    ep: dict[str, Any] = {
        "artifacts": {k: str(v) for k, v in arts.items()},
        "files": {},
        "manifest_accuracy": {},
        "targets": {},
    }
    for label, art in arts.items():
        _artifact_facts(ep, label, art)
    ep["quality_matched"] = _matched_quality(args, arts, model_dir, work, threads)
    return ep
