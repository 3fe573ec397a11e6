"""llama.cpp's side of ``benchmarks/vs_llamacpp.py``: the model converted to GGUF f32 and quantized with
llama.cpp's own tools, each file's tensor bytes, and ``llama-perplexity``'s quality figures. Its
``--kl-divergence-base`` file (:func:`read_kld_base`) also gives edgepipe's side the tokens to score."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.llamacpp import Paths
from benchmarks.vs_common import NUM, grab, run, say

QUANTS = ("Q8_0", "Q5_K_M", "Q4_0", "Q4_K_M")
CTX = 512


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


def llama_quality(
    lc: Paths, ggufs: dict[str, Path], eval_file: Path, work: Path, threads: int, compute: bool = True
) -> dict[str, Any]:
    """``compute=False``: only the figures already in the work folder's logs (nothing is run)."""
    base = work / f"kld-base-c{CTX}.bin"
    stamp = work / f"kld-base-c{CTX}.json"
    # the text's content, not its path or mtime: every checkout has its own copy of the packaged text
    ev_key = {"eval_sha256": hashlib.sha256(eval_file.read_bytes()).hexdigest()}
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
        stamp.write_text(json.dumps({"key": ev_key, "ppl": grab(r"Final estimate: PPL = " + NUM, out)}))
    out = (work / "ppl-f32.log").read_text()
    res["f32"] = {
        "perplexity": grab(r"Final estimate: PPL = " + NUM, out),
        "chunks": int(grab(r"calculating perplexity over (\d+) chunks", out) or 0),
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
        ratio = grab(r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*" + NUM, out)
        res[q] = {
            "perplexity": grab(r"Mean PPL\(Q\)\s*:\s*" + NUM, out),
            "reference_perplexity": grab(r"Mean PPL\(base\)\s*:\s*" + NUM, out),
            "ppl_increase_pct": None if ratio is None else 100.0 * (ratio - 1.0),
            "kl_divergence": grab(r"Mean    KLD:\s*" + NUM, out),
            "kl_divergence_99pct": grab(r"99\.0%\s+KLD:\s*" + NUM, out),
            "top1_agreement": (lambda v: None if v is None else v / 100.0)(
                grab(r"Same top p:\s*" + NUM, out)
            ),
        }
    return res


_CHUNK_ROW = re.compile(
    r"^\s*(\d+)\s+" + NUM + r"\s+±\s+\S+\s+" + NUM + r"\s+±\s+\S+\s+" + NUM + r"\s+±\s+\S+\s+\S+\s+±\s+\S+\s+%\s+" + NUM + r"\s+±",
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


def llama_results(lc: Paths, ggufs: dict[str, Path], eval_file: Path, work: Path, threads: int, compute: bool) -> dict[str, Any]:
    """llama.cpp's files (sizes, bytes read per token) and quality."""
    files = {
        name: {"path": str(path), "file_bytes": path.stat().st_size, **gguf_tensors(path)} for name, path in ggufs.items()
    }
    return {"files": files, "quality": llama_quality(lc, ggufs, eval_file, work, threads, compute=compute)}
