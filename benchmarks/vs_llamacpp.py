"""edgepipe vs llama.cpp on the same weights, on this machine, in one run.

    python benchmarks/vs_llamacpp.py [--model HF_FOLDER|austen | --random SHAPE | --random-llama] [--threads 2[,1]] [--eval FILE]
                                     [--calib FILE] [--match-sizes [--sized-only]]
                                     [--reps 3] [--no-speed] [--no-quality] [--no-edgepipe] [--no-passive] [--speed-f32]
                                     [--speed-quants Q8_0,Q4_0,Q4_K_M] [--no-int8] [--int4-target NAME|rtn]
                                     [--rebuild | --reuse] [--artifact int4=DIR] [--json OUT.json] [--markdown OUT.md]

Results of a run: ``benchmarks/RESULTS.md``.

What it does (everything is cached under ``$EDGEPIPE_CACHE/vs_llamacpp/<model sha>/``):

1. llama.cpp tools from the llama-cpp-python sdist (``benchmarks/llamacpp.py``, built once).
2. The HF folder -> GGUF f32 with llama.cpp's own converter (the full-precision reference), then
   ``llama-quantize`` to Q8_0, Q5_K_M, Q4_0 and Q4_K_M (no imatrix: llama.cpp's plain recipe).
   ``--model austen``: the fp32 Llama trained on Austen's novels (``benchmarks/train_austen.py``,
   cached); its held-out novel's opening is the eval text and a training slice the calibration text.
3. edgepipe artifacts from the same folder: ``x86-avx512`` (int8) and ``raspberrypi5`` (int4), via
   ``edgepipe.build`` (its stage cache makes a rebuild cheap; an artifact already built for
   the same target config and model is reused). ``--match-sizes``: also the int4 target with
   ``max_mb`` at Q4_0's and at Q4_K_M's file size (labels ``int4@Q4_0``, ``int4@Q4_K_M``), int4
   blocks 32/64/128 with and without zero points allowed (:func:`budget_profile`); ``--sized-only``:
   only those (the targets' own builds skipped, for a quick quality-at-size comparison).
4. Quality on the same text (``edgepipe/data/eval.txt`` by default):
   * llama.cpp: ``llama-perplexity -c 512 --kl-divergence-base`` on the f32 GGUF, then
     ``--kl-divergence`` for each quant: PPL ratio, mean KL, same-top-1, over every full
     512-token chunk, scoring the second half of each chunk (positions 256..510 predict 257..511).
   * edgepipe, same protocol: the token ids are read back from llama.cpp's base-logits file, so
     both engines see identical tokens; each chunk is run through the edgepipe artifact and its own
     fp32 ONNX export, and PPL ratio / exact KL / top-1 agreement are taken on the same positions.
     The f32 GGUF's stored log-probs give a cross-check (KL of edgepipe's quant and fp32 export
     against llama.cpp's f32 reference).
   * edgepipe's own figures from the artifact manifest (``metrics.accuracy``: first 8 windows of
     512 tokens, every position scored, vs the fp32 export) are reported alongside.
5. Speed, interleaved A B A B for ``--reps`` rounds with the same thread count (each edgepipe artifact
   right after its llama.cpp quant: ``int8`` after Q8_0, ``int4`` and ``int4@Q4_0`` after Q4_0,
   ``int4@Q4_K_M`` after Q4_K_M, so that equal-size pairs are timed side by side): llama-bench
   ``-p 128,512 -n 128 -r 1`` per round, and for edgepipe a fresh process that times a 128- and a
   512-token prefill from an empty cache and 128 single-token decode steps (warm-up first, like
   llama-bench) on the path ``generate()`` takes: the KV stepper (preallocated cache, IO binding)
   and the last position's logits only (artifacts with the ``logits_slice`` pass skip the lm_head
   on the other positions; llama-bench also computes the last token's output only). With more than one thread llama.cpp also runs with ``OMP_WAIT_POLICY=passive``:
   its OpenMP threads spin at barriers, which collapses when other processes share the cores;
   ratios are taken against the faster variant. Peak RSS of each process by ``/usr/bin/time -v``;
   edgepipe's own ``python -m edgepipe.runtime bench --json`` figure is reported too.
6. This machine's read bandwidth (``benchmarks/bandwidth.py``: OpenMP, the same thread count), and decode
   speed as a fraction of the bandwidth limit: bytes of weights read per generated token (all
   tensors, minus those a step reads one row of: an embedding table that is only gathered from,
   i.e. not tied to the output, and GroupQueryAttention's rotary cos/sin tables).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__:  # imported as benchmarks.vs_llamacpp (the tests)
    from .bandwidth import METHOD as BW_METHOD
    from .bandwidth import onnx_read_bytes, read_bandwidth_gbs
    from .llamacpp import RELEVANT_CPU_FLAGS, Paths, build_info, cpu_flags, ensure_llamacpp
    from .random_models import SHAPES, random_model_dir
    from .train_austen import austen_model
else:  # run as python benchmarks/vs_llamacpp.py: the script's folder is sys.path[0]
    from bandwidth import METHOD as BW_METHOD
    from bandwidth import onnx_read_bytes, read_bandwidth_gbs
    from llamacpp import RELEVANT_CPU_FLAGS, Paths, build_info, cpu_flags, ensure_llamacpp
    from random_models import SHAPES, random_model_dir
    from train_austen import austen_model

QUANTS = ("Q8_0", "Q5_K_M", "Q4_0", "Q4_K_M")
SPEED_QUANTS = ("Q8_0", "Q4_0", "Q4_K_M")  # the ones with an edgepipe counterpart (PAIRS)
SIZE_MATCHED = ("Q4_0", "Q4_K_M")  # --match-sizes: edgepipe --max-mb at these files' sizes
# what the matched builds' allocator chooses between (see budget_profile): int4 in blocks of 32, 64 and 128,
# with and without zero points (4.25 to 5.125 bits/weight with fp32 scales), and int8 in blocks of 64
BUDGET_FORMATS = tuple(f"int4/b{b}/{s}" for b in (32, 64, 128) for s in ("sym", "asym")) + ("int8/b64/asym",)
EDGEPIPE_TARGETS = {"x86-avx512": "int8", "raspberrypi5": "int4"}
# which llama.cpp quant each edgepipe artifact is compared with
PAIRS = (("int8", "Q8_0"), ("int4", "Q4_0"), ("int4", "Q4_K_M"), ("int4@Q4_0", "Q4_0"), ("int4@Q4_K_M", "Q4_K_M"))
# the edgepipe artifacts timed right after each llama.cpp quant in the interleaved loop (each label once)
TIMED_NEXT_TO = {"Q8_0": ("int8",), "Q4_0": ("int4", "int4@Q4_0"), "Q4_K_M": ("int4@Q4_K_M",)}
CTX = 512
PP = (128, 512)
TG = 128
PASSIVE = "(OMP passive)"
NOSPIN = "(no spinning)"

Progress = Callable[[str], None]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    cmd: list[Any], *, log: Path | None = None, env: dict[str, str] | None = None, check: bool = True
) -> str:
    cmd = [str(c) for c in cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = r.stdout + r.stderr
    if log:
        log.write_text(f"$ {' '.join(cmd)}\n{out}")
    if check and r.returncode:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{tail}")
    return out


# ------------------------------------------------------------------------------------------ GGUF


def convert_and_quantize(lc: Paths, model_dir: Path, work: Path, threads: int) -> dict[str, Path]:
    ggufs: dict[str, Path] = {}
    f32 = work / "f32.gguf"
    if not f32.is_file():
        say(f"converting {model_dir} to GGUF f32 with llama.cpp's convert_hf_to_gguf.py")
        tmp = work / "f32.gguf.tmp"
        run(lc.convert_cmd(model_dir, tmp, "f32"), log=work / "convert.log", env=lc.convert_env())
        os.replace(tmp, f32)
    ggufs["f32"] = f32
    for q in QUANTS:
        out = work / f"{q}.gguf"
        if not out.is_file():
            say(f"llama-quantize f32 -> {q}")
            tmp = work / f"{q}.gguf.tmp"
            run([lc.quantize, f32, tmp, q, threads], log=work / f"quantize-{q}.log")
            os.replace(tmp, out)
        ggufs[q] = out
    return ggufs


def gguf_tensors(path: Path) -> dict[str, Any]:
    """Tensor bytes by type, and the bytes a decode step reads (the embedding is skipped unless tied).

    Read with the installed ``gguf`` package (edgepipe's build extra); llama.cpp's own copy is only
    put on the converter's PYTHONPATH (``Paths.convert_env``)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    by_type: dict[str, int] = {}
    total = 0
    names = {}
    for t in r.tensors:
        n = int(t.n_bytes)
        total += n
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + n
        names[t.name] = (t.tensor_type.name, n)
    tied = "output.weight" not in names
    embd = names.get("token_embd.weight", ("", 0))
    read = total if tied else total - embd[1]
    return {
        "tensor_bytes": total,
        "bytes_by_type": by_type,
        "token_embd_type": embd[0],
        "output_type": names["output.weight"][0] if not tied else embd[0] + " (tied to token_embd)",
        "tied_embeddings": tied,
        "read_bytes_per_token": read,
    }


# --------------------------------------------------------------------------- llama-perplexity / KLD

_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def _grab(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def llama_quality(
    lc: Paths, ggufs: dict[str, Path], eval_file: Path, work: Path, threads: int, compute: bool = True
) -> dict[str, Any]:
    """``compute=False``: only the figures already in the work folder's logs (nothing is run)."""
    base = work / f"kld-base-c{CTX}.bin"
    stamp = work / f"kld-base-c{CTX}.json"
    ev_key = {"eval": str(eval_file), "mtime": eval_file.stat().st_mtime_ns, "size": eval_file.stat().st_size}
    res: dict[str, Any] = {}
    def ppl_cmd(model):
        """llama-perplexity on ``model`` with the shared context, batch, threads and base-logits file."""
        return [lc.perplexity, "-m", model, "-c", CTX, "-b", CTX, "-t", threads, "--kl-divergence-base", base]

    have_base = base.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == ev_key
    if not compute and not have_base:
        return res
    if not have_base:
        say(f"llama-perplexity: f32 reference logits on {eval_file.name} (-c {CTX})")
        out = run(
            [*ppl_cmd(ggufs["f32"]), "-f", eval_file],
            log=work / "ppl-f32.log",
        )
        stamp.write_text(json.dumps({"key": ev_key, "ppl": _grab(r"Final estimate: PPL = " + _NUM, out)}))
    out = (work / "ppl-f32.log").read_text()
    res["f32"] = {
        "perplexity": _grab(r"Final estimate: PPL = " + _NUM, out),
        "chunks": int(_grab(r"calculating perplexity over (\d+) chunks", out) or 0),
    }
    for q in QUANTS:
        log = work / f"kld-{q}-c{CTX}.log"
        if not (
            log.is_file() and "Mean    KLD" in log.read_text() and log.stat().st_mtime > base.stat().st_mtime
        ):
            if not compute:
                continue
            say(f"llama-perplexity --kl-divergence: {q} vs f32")
            run(
                [*ppl_cmd(ggufs[q]), "--kl-divergence"],
                log=log,
            )
        out = log.read_text()
        if "Mean    KLD" not in out:
            res[q] = running_means(out)
            continue
        ratio = _grab(r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*" + _NUM, out)
        res[q] = {
            "perplexity": _grab(r"Mean PPL\(Q\)\s*:\s*" + _NUM, out),
            "reference_perplexity": _grab(r"Mean PPL\(base\)\s*:\s*" + _NUM, out),
            "ppl_increase_pct": None if ratio is None else 100.0 * (ratio - 1.0),
            "kl_divergence": _grab(r"Mean    KLD:\s*" + _NUM, out),
            "kl_divergence_99pct": _grab(r"99\.0%\s+KLD:\s*" + _NUM, out),
            "top1_agreement": (lambda v: None if v is None else v / 100.0)(
                _grab(r"Same top p:\s*" + _NUM, out)
            ),
        }
    return res


_CHUNK_ROW = re.compile(
    r"^\s*(\d+)\s+" + _NUM + r"\s+±\s+\S+\s+" + _NUM + r"\s+±\s+\S+\s+" + _NUM + r"\s+±\s+\S+\s+\S+\s+±\s+\S+\s+%\s+" + _NUM + r"\s+±",
    re.MULTILINE,
)


def running_means(out: str) -> dict[str, Any]:
    """The last chunk's running means of a ``--kl-divergence`` log that ends without llama-perplexity's
    summary (seen with Q4_0 of the trained Austen model: the tool exits 0 after the last-but-one
    chunk): mean KL, same top-1 and the PPL change, marked with how many chunks they cover."""
    rows = _CHUNK_ROW.findall(out)
    if not rows:
        return {"perplexity": None, "ppl_increase_pct": None, "kl_divergence": None, "top1_agreement": None}
    chunk, ppl, ln_ratio, kl, same = rows[-1]
    return {
        "perplexity": float(ppl), "ppl_increase_pct": float(100.0 * np.expm1(float(ln_ratio))), "kl_divergence": float(kl),
        "top1_agreement": float(same) / 100.0, "chunks": int(chunk), "from_running_means": True,
    }


def read_kld_base(path: Path) -> tuple[int, np.ndarray, np.ndarray]:
    """llama-perplexity's ``--kl-divergence-base`` file: (n_ctx, tokens [chunks, n_ctx], log-probs of
    the scored positions [chunks, n_ctx - 1 - n_ctx/2, n_vocab] as float32).

    Layout: b"_logits_", u32 n_ctx, i32 n_vocab, i32 n_chunk, i32 tokens[n_chunk * n_ctx], then per
    chunk and scored position ``2*((n_vocab+1)//2) + 4`` uint16: two float32 (scale, min log-prob)
    and n_vocab uint16 q, log p = scale * q + min (floored 16 nats below the maximum).
    """
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity logits file")
        n_ctx = int(np.frombuffer(f.read(4), np.uint32)[0])
        n_vocab, n_chunk = (int(x) for x in np.frombuffer(f.read(8), np.int32))
        tokens = np.frombuffer(f.read(4 * n_chunk * n_ctx), np.int32).reshape(n_chunk, n_ctx)
        nv = 2 * ((n_vocab + 1) // 2) + 4
        n_pos = n_ctx - 1 - n_ctx // 2
        raw = np.frombuffer(f.read(2 * nv * n_pos * n_chunk), np.uint16).reshape(n_chunk, n_pos, nv)
    head = np.ascontiguousarray(raw[:, :, :4]).view(np.float32)  # [chunk, pos, 2]
    lp = raw[:, :, 4 : 4 + n_vocab].astype(np.float32) * head[:, :, :1] + head[:, :, 1:2]
    return n_ctx, tokens.astype(np.int64), lp


# ------------------------------------------------------------------------------------- edgepipe


def CausalLM_has_slice(art: Path) -> bool:
    """Whether the folder's graph has the logits_slice pass's input (see edgepipe.optimize)."""
    import onnx

    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    return any(i.name == "logits_start" for i in m.graph.input)


def rtn_profile(work: Path, target: str = "x86-avx2") -> Path:
    """``target`` (a shipped profile's name; ``x86-avx2``: int4 block 32 asymmetric, 8-bit embedding) with
    plain round-to-nearest instead of imatrix / GPTQ and without its size budget, so every matrix gets the
    profile's own ``bits`` / ``block_size`` (``raspberrypi5``: int4 b32 asym, the tied table int4 too), or
    those of a ``:b128sym`` / ``:b64asym`` suffix. On a random-init model calibration statistics and
    sensitivities mean nothing, and skipping them saves most of the build on a large model. Speed does not
    depend on the rounding."""
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


EDGEPIPE_SPEED_CODE = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from edgepipe.runtime.model import CausalLM
from edgepipe.runtime.facts import peak_rss_mb
art, threads, pps, tg = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4])
lm = CausalLM(art, threads=threads, spinning=sys.argv[5] == "spin")
vocab = lm.spec.vocab_size
ids = (np.arange(max(pps), dtype=np.int64) * 7919 + 13) % max(vocab - 1, 1) + 1   # as device.bench
# as generate() runs: the KV stepper (preallocated cache, IO binding), the last position's logits only
def prefill(p):
    lm.stepper(p).step(ids[:p], last_only=True)
def decode(n):
    st = lm.stepper(n + 1)
    nxt = int(np.argmax(st.step(ids[:1], last_only=True)[-1]))
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(st.step(np.array([nxt]), last_only=True)[-1]))
    return n / (time.perf_counter() - t0)
out = {}
for p in pps:   # warm-up once per shape, like llama-bench's warm-up run per test
    prefill(p)
decode(4)
for p in pps:
    t0 = time.perf_counter()
    prefill(p)
    out[f"pp{p}"] = p / (time.perf_counter() - t0)
out[f"tg{tg}"] = decode(tg)
out["vmhwm_mb"] = peak_rss_mb()
out["threads"] = lm.session.get_session_options().intra_op_num_threads
out["logits_slice"] = lm.can_slice_logits
print(json.dumps(out))
"""


def time_v(cmd: list[Any], env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run under /usr/bin/time -v; return stdout and the peak RSS in MB."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        r = subprocess.run(
            ["/usr/bin/time", "-v", "-o", tf.name, *map(str, cmd)], capture_output=True, text=True, env=env
        )
        if r.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {r.stderr.strip()[-800:]}")
        rss = _grab(r"Maximum resident set size \(kbytes\):\s*(\d+)", tf.read())
    return r.stdout, (rss or 0) / 1024


def llama_speed(lc: Paths, gguf: Path, threads: int, passive: bool = False) -> dict[str, float]:
    """llama-bench; ``passive``: OMP_WAIT_POLICY=passive, so that OpenMP threads sleep at barriers
    instead of spinning (spinning collapses when other processes share the cores)."""
    env = dict(os.environ, OMP_WAIT_POLICY="passive") if passive else None
    out, rss = time_v(
        env=env,
        cmd=[
            lc.bench,
            "-m",
            gguf,
            "-p",
            ",".join(map(str, PP)),
            "-n",
            TG,
            "-t",
            threads,
            "-r",
            1,
            "-o",
            "json",
        ],
    )
    res: dict[str, float] = {"peak_rss_mb": rss}
    for row in json.loads(out):
        key = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        res[key] = float(row["avg_ts"])
    return res


def edgepipe_speed(art: Path, threads: int, spinning: bool = True) -> dict[str, float]:
    """``spinning=False``: onnxruntime's threads sleep between ops (the counterpart of llama.cpp's
    OMP_WAIT_POLICY=passive rows)."""
    out, rss = time_v(
        [sys.executable, "-c", EDGEPIPE_SPEED_CODE, art, threads, ",".join(map(str, PP)), TG, "spin" if spinning else "nospin"]
    )
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = rss
    return res


def edgepipe_runtime_bench(art: Path, threads: int) -> dict[str, Any]:
    out, rss = time_v(
        [sys.executable, "-m", "edgepipe.runtime", "bench", art, "--json", "--threads", threads]
    )
    res = json.loads(out.strip().splitlines()[-1])
    res["time_v_peak_rss_mb"] = rss
    return res


# -------------------------------------------------------------------------------------- report


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"cores": os.cpu_count(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        facts["cpu_model"] = (re.search(r"Model name:\s*(.+)", lscpu) or [None, "?"])[1].strip()
    except OSError:
        facts["cpu_model"] = platform.processor()
    host = cpu_flags()
    facts["cpu_flags"] = [f for f in RELEVANT_CPU_FLAGS if f in host]
    try:
        facts["ram_gb"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    facts["loadavg"] = os.getloadavg()
    return facts


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "–"
    return format(v, spec)


def _med(rows: list[dict[str, float]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _span(rows: list[dict[str, float]], key: str, spec: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return format(vals[0], spec)
    return f"{format(statistics.median(vals), spec)} ({format(min(vals), spec)}–{format(max(vals), spec)})"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def _files(R: dict[str, Any], name: str) -> dict[str, Any]:
    return R["llama"]["files"].get(name) or R["edgepipe"]["files"][name]


def _best_llama(speed: dict[str, list], lq: str, key: str) -> tuple[float | None, str]:
    """The faster of llama.cpp's variants (default OpenMP spin-wait, OMP_WAIT_POLICY=passive)."""
    return _best(speed, lq, key, PASSIVE)


def _best(speed: dict[str, list], name: str, key: str, variant: str) -> tuple[float | None, str]:
    """The faster of an engine's two thread-waiting variants (spin-wait, sleeping)."""
    cands = [(_med(speed.get(n, []), key), n) for n in (name, f"{name} {variant}")]
    cands = [c for c in cands if c[0] is not None]
    return max(cands) if cands else (None, name)


def _quality_table(R: dict[str, Any], ep: dict[str, Any]) -> list[str]:
    lines = [
        "Quality and size (llama.cpp: llama-perplexity --kl-divergence vs the f32 GGUF; edgepipe: the same tokens and "
        "scored positions vs its fp32 ONNX export; KL with llama.cpp's -16 log-prob cut-off):",
        "",
        "| engine | weights | file MB | weights read/token MB | PPL | PPL +% | mean KL | same top-1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [
        ("llama.cpp", n, R["llama"]["files"][n], R["llama"]["quality"].get(n, {})) for n in ["f32", *QUANTS]
    ]
    rows += [
        ("edgepipe", n, ep["files"][n], ep["quality_matched"].get(n, {})) for n in ep.get("artifacts", {})
    ]
    for eng, name, g, q in rows:
        lines.append(
            f"| {eng} | {name} | {g['file_bytes'] / 1e6:.1f} | {g['read_bytes_per_token'] / 1e6:.1f} | "
            f"{_fmt(q.get('perplexity'), '.3f')} | {_fmt(q.get('ppl_increase_pct'), '.2f')} | "
            f"{_fmt(q.get('kl_divergence'), '.4f')} | {_fmt(q.get('top1_agreement'), '.3f')} |"
        )
    return lines


def _speed_table(R: dict[str, Any], ep: dict[str, Any], T: str, speed: dict[str, list], bw: float | None) -> list[str]:
    lines = [
        "",
        f"Speed with {T.lstrip('t')} thread(s), tokens/s, median of {R['reps']} interleaved reps (min–max); "
        "peak RSS from /usr/bin/time -v:",
        "",
        "| engine | weights | pp128 | pp512 | tg128 | decode % of read BW | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, reps in speed.items():
        base = name.split(" ")[0]
        eng = "edgepipe" if base in ep.get("artifacts", {}) else "llama.cpp"
        tg = _med(reps, f"tg{TG}")
        frac = tg * _files(R, base)["read_bytes_per_token"] / (bw * 1e9) * 100 if (tg and bw) else None
        lines.append(
            f"| {eng} | {name} | {_span(reps, 'pp128', '.0f')} | {_span(reps, 'pp512', '.0f')} | {_span(reps, f'tg{TG}', '.1f')} | "
            f"{_fmt(frac, '.0f')} | {_fmt(_med(reps, 'peak_rss_mb'), '.0f')} |"
        )
    return lines


RATIO_KEYS = (f"tg{TG}", "pp128", "pp512")


def _ratio_cells(R: dict[str, Any], ep: dict[str, Any], e: str, lq: str, Ts: list[str]) -> list[str]:
    """One row of the ratio table: speed per thread count, peak RSS (first thread count), size, quality."""
    cells = []
    for T in Ts:
        sp = R["speed"][T]
        for key in RATIO_KEYS:
            b, _ = _best_llama(sp, lq, key)
            a, _ = _best(sp, e, key, NOSPIN)
            cells.append(_fmt(_ratio(a, b)))
    for T in Ts[:1]:
        sp = R["speed"][T]
        cells.append(_fmt(_ratio(_med(sp.get(e, []), "peak_rss_mb"), _med(sp.get(lq, []), "peak_rss_mb"))))
    a_q, b_q = ep["quality_matched"].get(e, {}), R["llama"]["quality"].get(lq, {})
    cells += [
        _fmt(_ratio(ep["files"][e]["file_bytes"], R["llama"]["files"][lq]["file_bytes"])),
        _fmt(_ratio(a_q.get("ppl_increase_pct"), b_q.get("ppl_increase_pct"))),
        _fmt(_ratio(a_q.get("kl_divergence"), b_q.get("kl_divergence"))),
    ]
    return cells


def _ratio_table(R: dict[str, Any], ep: dict[str, Any]) -> list[str]:
    Ts = list((R.get("speed") or {}).keys())
    head = ["edgepipe vs llama.cpp", *(f"{k} ({T})" for T in Ts for k in RATIO_KEYS), *(f"peak RSS ({T})" for T in Ts[:1])]
    lines = [
        "",
        "Ratios edgepipe / llama.cpp (speed: > 1 = edgepipe faster, the faster variant of each engine "
        "(spin-wait or sleeping threads); peak RSS, size, PPL increase, KL: < 1 = edgepipe better):",
        "",
        "| " + " | ".join([*head, "file size", "PPL increase", "mean KL"]) + " |",
        "|---|" + "---:|" * (len(RATIO_KEYS) * len(Ts) + len(Ts[:1]) + 3),
    ]
    for e, lq in PAIRS:
        if e in ep["artifacts"]:
            lines.append(f"| {e} / {lq} | " + " | ".join(_ratio_cells(R, ep, e, lq, Ts)) + " |")
    return lines


def _validation_table(ep: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "edgepipe's own validation (artifact manifest `metrics.accuracy`, vs its fp32 ONNX export, exact KL) "
        "next to the matched protocol:",
        "",
        "| artifact | target | manifest eval | PPL | ref PPL | PPL +% | mean KL | top-1 agree | matched: exact KL | matched vs llama.cpp f32: PPL +% / KL |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in ep["manifest_accuracy"].items():
        mq = ep["quality_matched"].get(label, {})
        x = mq.get("vs_llama_f32", {})
        lines.append(
            f"| {label} | {ep['targets'][label]} | {ep['eval'][label]} | {_fmt(m.get('perplexity'), '.3f')} | {_fmt(m.get('reference_perplexity'), '.3f')} | "
            f"{_fmt(m.get('ppl_increase_pct'), '.2f')} | {_fmt(m.get('kl_divergence'), '.4f')} | {_fmt(m.get('top1_agreement'), '.3f')} | "
            f"{_fmt(mq.get('kl_divergence_exact'), '.4f')} | {_fmt(x.get('ppl_increase_pct'), '.2f')} / {_fmt(x.get('kl_divergence'), '.4f')} |"
        )
    return lines


def _edgepipe_notes(ep: dict[str, Any]) -> list[str]:
    """The fp32 reference check on the matched positions and the runtime's own bench figures."""
    lines: list[str] = []
    x = ep["quality_matched"].get("fp32_vs_llama_f32")
    if x:
        lines.append("")
        lines.append(
            f"Reference check on the matched positions: edgepipe fp32 ONNX PPL {x['perplexity']:.4f} vs llama.cpp f32 GGUF PPL "
            f"{x['reference_perplexity']:.4f} ({x['ppl_increase_pct']:+.3f}%), KL {x['kl_divergence']:.5f}, same top-1 {x['top1_agreement']:.4f}."
        )
    rb = ep.get("runtime_bench")
    if rb:
        lines.append("")
        lines.append(
            "`python -m edgepipe.runtime bench ARTIFACT --json` (256-token prefill, 64 decode steps, best of 2): "
            + "; ".join(
                f"{k}: prefill {v['prefill_tok_s']:.0f} tok/s, decode {v['decode_tok_s']:.1f} tok/s, peak RSS {v['peak_rss_mb']:.0f} MB "
                f"(time -v {v['time_v_peak_rss_mb']:.0f} MB)"
                for k, v in rb.items()
            )
            + "."
        )
    return lines


def machine_lines(R: dict[str, Any]) -> list[str]:
    """The CPU the tables were measured on, its instruction-set flags and what llama.cpp was built with."""
    m, lc = R.get("machine") or {}, R.get("llamacpp") or {}
    isa = lc.get("isa")
    return [
        f"CPU: {m.get('cpu_model', '?')}, {m.get('cores', '?')} logical cores; flags: {' '.join(m.get('cpu_flags') or []) or '?'}",
        f"llama.cpp {lc.get('llama_cpp', '?')} built with: {' '.join(isa) if isa else ' '.join(f for f in lc.get('cmake_flags', []) if 'GGML_' in f) or '?'}",
        "",
    ]


def summarize(R: dict[str, Any]) -> str:
    bw = (R.get("bandwidth") or {}).get("read_gbs")
    ep = R.get("edgepipe") or {}
    lines = machine_lines(R) + _quality_table(R, ep)
    for T, speed in (R.get("speed") or {}).items():
        lines += _speed_table(R, ep, T, speed, bw)
    if ep:
        lines += _ratio_table(R, ep) + _validation_table(ep) + _edgepipe_notes(ep)
    if bw:
        lines.append("")
        lines.append(
            f"Read bandwidth ({R['bandwidth']['threads']} threads, {R['bandwidth']['method']}): {bw:.1f} GB/s."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help="Hugging Face folder (default: edgepipe's default SmolLM2), or 'austen': the fp32 Llama trained on "
        "Austen's novels (benchmarks/train_austen.py, trained once and cached; its held-out and calibration texts "
        "become the --eval and --calib defaults)",
    )
    p.add_argument("--calib", type=Path, help="calibration text for the edgepipe builds (default: the packaged text)")
    p.add_argument(
        "--match-sizes",
        action="store_true",
        help=f"also build the int4 target with --max-mb at each of {', '.join(SIZE_MATCHED)}'s file sizes",
    )
    p.add_argument(
        "--random",
        choices=sorted(SHAPES),
        help="instead of --model: a random-init model of this shape (benchmarks/random_models.py, created and cached; "
        "builds pass --allow-untrained), e.g. qwen2.5-0.5b: Qwen2.5-0.5B's config",
    )
    p.add_argument(
        "--random-llama",
        action="store_const",
        dest="random",
        const="llama-709m",
        help="the same as --random llama-709m: issue 6's random-init Llama (hidden 2048, 10 layers, 709M params)",
    )
    p.add_argument(
        "--speed-quants",
        default=",".join(SPEED_QUANTS),
        help=f"llama.cpp quants to time (default {','.join(SPEED_QUANTS)}; each is timed next to its edgepipe counterpart)",
    )
    p.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="time this prebuilt edgepipe folder as LABEL (int8, int4, int4@Q4_0 or int4@Q4_K_M: the last two are "
        "timed next to the quant whose size they match) instead of building one (repeatable)",
    )
    p.add_argument("--no-int8", action="store_true", help="build and compare the int4 artifact only")
    p.add_argument("--sized-only", action="store_true", help="with --match-sizes: build only the size-matched artifacts")
    p.add_argument(
        "--int4-target",
        help="edgepipe profile (name or .yaml) for the int4 artifact (default raspberrypi5; with --random "
        "'rtn': x86-avx2 with round-to-nearest; 'rtn:NAME[:b128sym]': profile NAME with round-to-nearest, no size "
        "budget and optionally another int4 block size / symmetry for every matrix, see rtn_profile)",
    )
    p.add_argument(
        "--threads", default="2", help="thread count, or a comma list to measure several (e.g. 2,1)"
    )
    p.add_argument("--eval", dest="eval_file", type=Path, help="eval text (default: edgepipe/data/eval.txt)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-speed", action="store_true", help="quality and sizes only")
    p.add_argument("--no-edgepipe", action="store_true", help="llama.cpp only")
    p.add_argument(
        "--no-quality",
        action="store_true",
        help="run no quality measurement: report only the figures already cached in the work folder",
    )
    p.add_argument(
        "--no-passive",
        action="store_true",
        help="do not also run llama.cpp with OMP_WAIT_POLICY=passive (threads > 1)",
    )
    p.add_argument("--speed-f32", action="store_true", help="also time the f32 GGUF")
    p.add_argument(
        "--rebuild", action="store_true", help="build the edgepipe artifacts again even if current"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse edgepipe artifacts of the same model and target even if edgepipe's code is newer",
    )
    p.add_argument(
        "--json", type=Path, help="write every figure here (default: the work folder's results.json)"
    )
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    return p


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with ``speed_quants`` and ``threads`` as lists; contradictions are usage errors."""
    p = _parser()
    args = p.parse_args(argv)
    args.speed_quants = [q.strip() for q in args.speed_quants.split(",") if q.strip()]
    if set(args.speed_quants) - set(QUANTS):
        p.error(f"--speed-quants takes some of {','.join(QUANTS)}")
    if args.random and args.model:
        p.error("--random / --random-llama and --model exclude each other")
    args.threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    labels = {e for e, _ in PAIRS}
    for a in args.artifact:
        if "=" not in a or a.split("=", 1)[0] not in labels:
            p.error(f"--artifact takes LABEL=DIR with LABEL one of {', '.join(sorted(labels))}: {a!r}")
    return args


def _edgepipe_targets(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """Profile (name or .yaml path) -> label of each edgepipe artifact to build."""
    int4_target = args.int4_target or ("rtn" if args.random else "raspberrypi5")
    ep_targets = {} if args.no_int8 else {"x86-avx512": "int8"}
    if int4_target == "rtn" or int4_target.startswith("rtn:"):
        int4_target = str(rtn_profile(work, int4_target[4:] or "x86-avx2"))
    ep_targets[int4_target] = "int4"
    return ep_targets


def _run_facts(args: argparse.Namespace, lc: Paths, model_dir: Path, info: Any, eval_file: Path, work: Path) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": str(model_dir),
        "model_sha256": info.sha256,
        "parameters": info.num_parameters,
        "eval_file": str(eval_file),
        "threads": args.threads,
        "reps": args.reps,
        "machine": machine_facts(),
        "llamacpp": {
            "llama_cpp_python": lc.version,
            "llama_cpp": lc.commit,
            **{k: v for k, v in build_info(lc.root).items() if k not in ("version", "commit")},
        },
        "work": str(work),
    }


def llama_results(lc: Paths, ggufs: dict[str, Path], eval_file: Path, work: Path, threads: int, compute: bool) -> dict[str, Any]:
    """llama.cpp's files (sizes, bytes read per token) and quality."""
    files = {
        name: {"path": str(path), "file_bytes": path.stat().st_size, **gguf_tensors(path)} for name, path in ggufs.items()
    }
    return {"files": files, "quality": llama_quality(lc, ggufs, eval_file, work, threads, compute=compute)}


def _artifacts(
    args: argparse.Namespace, model_dir: Path, work: Path, ep_targets: dict[str, str], ggufs: dict[str, Path], texts: dict[str, Path]
) -> dict[str, Path]:
    """``--artifact`` folders, the edgepipe builds for the labels they do not cover, and with
    ``--match-sizes`` the int4 target built at llama.cpp's file sizes."""
    given = dict(a.split("=", 1) for a in args.artifact)
    arts = {k: Path(v).resolve() for k, v in given.items()}
    if set(ep_targets.values()) - set(arts) and not (args.match_sizes and args.sized_only):
        ep_targets = {t: label for t, label in ep_targets.items() if label not in arts}
        arts.update(
            edgepipe_artifacts(
                model_dir, work, say, rebuild=args.rebuild, targets=ep_targets, reuse_any=args.reuse,
                allow_random_weights=bool(args.random), texts=texts,
            )
        )
    if args.match_sizes:
        int4 = next(t for t, label in _edgepipe_targets(args, work).items() if label == "int4")
        sizes = {q: ggufs[q].stat().st_size for q in SIZE_MATCHED}
        arts.update(sized_artifacts(model_dir, work, say, int4, sizes, texts, rebuild=args.rebuild, reuse_any=args.reuse))
    return arts


def _model_and_texts(args: argparse.Namespace) -> tuple[Path, Path, dict[str, Path]]:
    """The model folder, the evaluation text, and the calibration / evaluation texts of the edgepipe
    builds. ``--model austen``: the trained Austen model, its held-out and calibration slices."""
    from edgepipe.models import default_model_dir

    packaged_eval = Path(__file__).resolve().parent.parent / "edgepipe" / "data" / "eval.txt"
    if args.model == "austen":
        model_dir = austen_model(progress=say)
        eval_file, calib = args.eval_file or model_dir / "heldout.txt", args.calib or model_dir / "calib.txt"
    else:
        model_dir = random_model_dir(args.random, say) if args.random else Path(args.model) if args.model else default_model_dir(say)
        eval_file, calib = args.eval_file or packaged_eval, args.calib
    texts = {"calib": calib.resolve()} if calib else {}
    if args.eval_file or args.model == "austen":
        texts["eval_file"] = eval_file.resolve()
    return model_dir.resolve(), eval_file.resolve(), texts


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


Timed = Callable[[], dict[str, float]]


def _speed_order(
    args: argparse.Namespace, lc: Paths, ggufs: dict[str, Path], arts: dict[str, Path], T: int
) -> list[tuple[str, Timed]]:
    """A B A B: each llama.cpp quant (spin-wait and passive OpenMP) next to its edgepipe counterparts
    (:data:`TIMED_NEXT_TO`: the size-matched artifacts next to the quant whose size they match)."""
    order: list[tuple[str, Timed]] = []
    variants = T > 1 and not args.no_passive
    quants = [q for q in TIMED_NEXT_TO if q in args.speed_quants] + (["f32"] if args.speed_f32 else [])
    for lq in quants:
        order.append((lq, lambda g=ggufs[lq], T=T: llama_speed(lc, g, T)))
        for e in (e for e in TIMED_NEXT_TO.get(lq, ()) if e in arts):
            order.append((e, lambda a=arts[e], T=T: edgepipe_speed(a, T)))
            if variants:
                order.append((f"{e} {NOSPIN}", lambda a=arts[e], T=T: edgepipe_speed(a, T, spinning=False)))
        if variants:
            order.append((f"{lq} {PASSIVE}", lambda g=ggufs[lq], T=T: llama_speed(lc, g, T, passive=True)))
    return order


def _bandwidth_between(work: Path, threads: int, bw_runs: list[float]) -> None:
    bw_runs.append(read_bandwidth_gbs(work, threads)["read_gbs"])
    say(f"read bandwidth: {bw_runs[-1]:.1f} GB/s")


def speed_results(
    args: argparse.Namespace, lc: Paths, ggufs: dict[str, Path], arts: dict[str, Path], work: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Interleaved speed runs per thread count, and the read bandwidth measured before and between rounds."""
    bw_runs: list[float] = []
    _bandwidth_between(work, args.threads[0], bw_runs)
    speed: dict[str, Any] = {}
    for T in args.threads:
        order = _speed_order(args, lc, ggufs, arts, T)
        runs = speed[f"t{T}"] = {}
        for rep in range(args.reps):
            for name, fn in order:
                r = fn()
                r["rep"], r["load1"] = rep, os.getloadavg()[0]
                runs.setdefault(name, []).append(r)
                say(
                    f"t{T} rep {rep + 1}/{args.reps} {name}: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k != "rep")
                )
            _bandwidth_between(work, args.threads[0], bw_runs)  # between rounds: other jobs come and go
    bandwidth = {
        "read_gbs": max(bw_runs),
        "runs_gbs": bw_runs,
        "threads": args.threads[0],
        "method": f"{BW_METHOD} (benchmarks/bandwidth.py), highest of {len(bw_runs)} measurements spread over the run",
    }
    return speed, bandwidth


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    import edgepipe
    from edgepipe.models import cache_root

    t_start = time.time()
    load_before = os.getloadavg()
    lc = ensure_llamacpp(say)
    model_dir, eval_file, texts = _model_and_texts(args)
    info = edgepipe.inspect_model(model_dir)
    work = cache_root() / "vs_llamacpp" / info.sha256[:16]
    work.mkdir(parents=True, exist_ok=True)
    ep_targets = _edgepipe_targets(args, work)
    T = args.threads[0]
    R = _run_facts(args, lc, model_dir, info, eval_file, work)

    ggufs = convert_and_quantize(lc, model_dir, work, T)
    R["llama"] = llama_results(lc, ggufs, eval_file, work, T, compute=not args.no_quality)

    arts: dict[str, Path] = {}
    if not args.no_edgepipe:
        arts = _artifacts(args, model_dir, work, ep_targets, ggufs, texts)
        R["edgepipe"] = edgepipe_results(args, arts, model_dir, work, T)

    if not args.no_speed:
        R["speed"], R["bandwidth"] = speed_results(args, lc, ggufs, arts, work)
        if arts:
            R["edgepipe"]["runtime_bench"] = {label: edgepipe_runtime_bench(a, T) for label, a in arts.items()}
    R["load_before"], R["load_after"] = load_before, os.getloadavg()
    R["seconds"] = round(time.time() - t_start, 1)

    out_json = args.json or work / "results.json"
    out_json.write_text(json.dumps(R, indent=2, default=str))
    text = summarize(R)
    print(text)
    print(
        f"\nall figures: {out_json}; load average before {load_before[0]:.2f}, after {R['load_after'][0]:.2f}"
    )
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
