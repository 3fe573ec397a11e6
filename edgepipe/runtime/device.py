"""What a device does with an artifact: verify it, generate, validate accuracy, measure speed.

These functions are the body of ``python -m edgepipe.runtime`` (the entry point that runs on a
board or under qemu with only onnxruntime, numpy and tokenizers) and of the host CLI's
``run`` / ``validate`` / ``bench`` commands.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import ArtifactError, InputError
from edgepipe.runtime.evaluate import score, score_against_reference, windows_from_ids
from edgepipe.runtime.generate import GenerationConfig, generate
from edgepipe.runtime.manifest import verify_artifact
from edgepipe.runtime.model import CausalLM
from edgepipe.runtime.static_lm import StaticCausalLM, is_static_artifact

REFERENCE = "reference.npz"
TOKENIZER = "tokenizer.json"
Progress = Callable[[str], None]


def load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / TOKENIZER
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; rebuild the artifact")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ArtifactError(f"{path} cannot be read by tokenizers ({str(e)[:200]}); rebuild the artifact") from None


def artifact_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.name.startswith("model.onnx"))


def mem_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def check_free_ram(artifact: Path, manifest: dict[str, Any] | None = None) -> None:
    """Refuse to load when the device has clearly too little free memory for the model."""
    need = artifact_bytes(artifact) / 2**20 * 1.3 + 64
    metrics = (manifest or {}).get("metrics")
    throughput = metrics.get("throughput") if isinstance(metrics, dict) else None
    measured = throughput.get("peak_rss_mb") if isinstance(throughput, dict) else None
    if isinstance(measured, (int, float)) and not isinstance(measured, bool) and 0 < measured < 1e7:
        need = max(need, float(measured))
    avail = mem_available_mb()
    if avail is not None and avail < need:
        raise InputError(
            f"this device has {avail:.0f} MB of free RAM and the artifact needs about {need:.0f} MB; "
            "close other programs or build for a smaller target"
        )


def open_artifact(
    artifact: Path | str, *, threads: int = 0, verify: bool = True
) -> tuple[CausalLM | StaticCausalLM, dict[str, Any]]:
    """Verify the manifest, then load the model: a CPU artifact (one dynamic decoder graph) or an
    NPU one (static prefill + decode graphs, ``npu_config.json``) on the HTP when onnxruntime-qnn
    is installed, else its QDQ graphs on the CPU."""
    artifact = Path(artifact)
    manifest = verify_artifact(artifact) if verify else {}
    check_free_ram(artifact, manifest)
    if is_static_artifact(artifact):
        return StaticCausalLM(artifact, threads=threads), manifest
    return CausalLM(artifact, threads=threads or _target_threads(manifest)), manifest


def _target_threads(manifest: dict[str, Any]) -> int:
    t = ((manifest.get("target") or {}).get("runtime") or {}).get("threads", 0)
    return int(t) if isinstance(t, int) and t > 0 and t <= (os.cpu_count() or 1) else 0


def run_prompt(artifact: Path | str, prompt: str, cfg: GenerationConfig, *, threads: int = 0) -> Iterator[str]:
    """Verify and load the artifact now (errors surface before any output), then return an
    iterator of decoded text pieces as they are generated."""
    lm, _ = open_artifact(artifact, threads=threads)
    tok = load_tokenizer(Path(artifact))
    ids = tok.encode(prompt).ids
    if not ids:
        raise InputError("the prompt is empty after tokenization; pass some text with --prompt")

    def pieces() -> Iterator[str]:
        out: list[int] = []
        printed = ""
        for token in generate(lm, ids, cfg):
            out.append(token)
            text = tok.decode(out)
            if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                yield text[len(printed):]
                printed = text

    return pieces()


def device_facts() -> dict[str, Any]:
    import onnxruntime as ort

    facts: dict[str, Any] = {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "cpu_count": os.cpu_count(),
    }
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu part") and "cpu_model" not in facts:
                facts["cpu_model"] = val.strip()
            if key in ("flags", "features") and "cpu_features" not in facts:
                facts["cpu_features"] = val.split()
    except OSError:
        pass
    mem = mem_available_mb()
    try:
        total = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) / 1024
        facts["ram_total_mb"] = round(total)
    except (OSError, ValueError, IndexError):
        pass
    if mem is not None:
        facts["ram_available_mb"] = round(mem)
    return facts


def peak_rss_mb() -> float:
    """This process's peak resident set. VmHWM belongs to the process image, unlike ru_maxrss,
    which Linux carries over from the parent across fork + exec (a 2 GB build would show through)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if platform.system() != "Darwin" else r / 2**20


def bench(lm: CausalLM | StaticCausalLM, *, prompt_tokens: int = 256, decode_tokens: int = 64, repeats: int = 2) -> dict[str, Any]:
    """Prefill tok/s, decode tok/s, time to first token and peak RSS of this process.

    Token ids are a fixed synthetic sequence: speed does not depend on the text. Each figure is
    the best of ``repeats`` runs after one warm-up.
    """
    if isinstance(lm, StaticCausalLM):
        return bench_static(lm, decode_tokens=min(decode_tokens, 16), repeats=repeats)
    vocab = lm.spec.vocab_size
    ids = (np.arange(prompt_tokens, dtype=np.int64) * 7919 + 13) % max(vocab - 1, 1) + 1
    short = ids[:32]
    lm.forward(short[None, :8], lm.empty_cache(), last_only=True)  # warm-up: allocations, prepacking
    prefill, ttft, decode = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lm.forward(ids[None, :], lm.empty_cache(), last_only=True)  # as generation: the last logits only
        prefill.append(prompt_tokens / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        state = lm.stepper(len(short) + decode_tokens)  # what generate() does
        nxt = int(np.argmax(state.step(short, last_only=True)[-1]))
        ttft.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            nxt = int(np.argmax(state.step(np.array([nxt]), last_only=True)[-1]))
        decode.append(decode_tokens / (time.perf_counter() - t0))
    return {
        "prefill_tokens": prompt_tokens,
        "prefill_tok_s": round(max(prefill), 2),
        "decode_tokens": decode_tokens,
        "decode_tok_s": round(max(decode), 2),
        "ttft_ms": round(min(ttft), 2),
        "ttft_prompt_tokens": len(short),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": lm.session.get_session_options().intra_op_num_threads,
        "repeats": repeats,
    }


def bench_static(lm: StaticCausalLM, *, decode_tokens: int = 16, repeats: int = 2) -> dict[str, Any]:
    """``bench`` for a static-graph artifact: one full prefill graph run (its fixed length, however
    short the prompt) and single-token decode steps, on whatever backend ``lm`` runs. On the x86
    HTP simulator these figures say nothing about a phone."""
    spec = lm.spec
    decode_tokens = max(1, min(decode_tokens, spec.context_length - spec.seq_len))
    ids = (np.arange(spec.seq_len, dtype=np.int64) * 7919 + 13) % max(lm.vocab_size - 1, 1) + 1
    prefill, decode = [], []
    for _ in range(repeats):
        state = lm.stepper(spec.seq_len + decode_tokens)
        t0 = time.perf_counter()
        nxt = int(np.argmax(state.step(ids)[-1]))
        prefill.append(spec.seq_len / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            nxt = int(np.argmax(state.step(np.array([nxt]))[-1]))
        decode.append(decode_tokens / (time.perf_counter() - t0))
    return {
        "backend": lm.backend,
        "prefill_tokens": spec.seq_len,
        "prefill_tok_s": round(max(prefill), 2),
        "decode_tokens": decode_tokens,
        "decode_tok_s": round(max(decode), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "repeats": repeats,
        "note": "the first decode step of each repeat includes opening the decode session"
        if lm.backend == "htp" else "QDQ graphs on the CPU execution provider",
    }


def validate(
    artifact: Path | str,
    *,
    eval_text: str | None = None,
    max_tokens: int | None = None,
    window: int = 512,
    with_bench: bool = True,
    threads: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Validate an artifact on this device.

    Without ``eval_text`` the model is scored on the artifact's own evaluation windows against the
    fp32 reference it carries (and against the build host's tokens); with ``eval_text`` only the
    perplexity of this model on that text can be measured here.
    """
    artifact = Path(artifact)
    if progress:
        progress("verifying manifest hashes")
    lm, manifest = open_artifact(artifact, threads=threads)
    result: dict[str, Any] = {"artifact": str(artifact), "verified": True, "device": device_facts()}
    if eval_text is not None:
        tok = load_tokenizer(artifact)
        ids = tok.encode(eval_text).ids
        if max_tokens:
            ids = ids[: max_tokens + 1]
        if isinstance(lm, StaticCausalLM):
            window = min(window, lm.spec.context_length)  # the KV cache bounds a window
        wins = windows_from_ids(ids, window)
        if not wins:
            raise InputError("the eval text has fewer than 2 tokens; pass a longer --eval file")
        result["accuracy"] = score(lm.logits, wins, progress=progress).result()
        result["accuracy"]["source"] = "eval text (no reference on this device)"
    else:
        ref_path = artifact / REFERENCE
        if isinstance(lm, StaticCausalLM):
            raise InputError(
                "an NPU artifact carries no reference logits (its build scored it on the HTP simulator); "
                "pass --eval FILE to measure perplexity on this device"
            )
        if not ref_path.is_file():
            raise ArtifactError(f"{ref_path} is missing; pass --eval FILE or rebuild the artifact")
        with np.load(ref_path) as z:
            ref = {k: z[k] for k in z.files}
        result["accuracy"] = score_against_reference(lm.logits, ref, max_tokens=max_tokens, progress=progress)
        result["accuracy"]["source"] = "artifact reference windows (fp32 export's top-k and host top-1)"
    if with_bench:
        if progress:
            progress("measuring throughput")
        result["throughput"] = bench(lm)
    return result
