"""The tables ``benchmarks/vs_llamacpp.py`` prints (markdown) from its results, and the machine they were measured on."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.isa import RELEVANT_CPU_FLAGS, cpu_flags, masked_flags
from benchmarks.vs_edgepipe_side import PAIRS
from benchmarks.vs_llama_side import QUANTS
from benchmarks.vs_speed import NOSPIN, PASSIVE, TG


def machine_facts(isa: str = "host") -> dict[str, Any]:
    facts: dict[str, Any] = {"cores": os.cpu_count(), "python": platform.python_version(), "isa": isa}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        facts["cpu_model"] = (re.search(r"Model name:\s*(.+)", lscpu) or [None, "?"])[1].strip()
    except OSError:
        facts["cpu_model"] = platform.processor()
    host = masked_flags(cpu_flags(), isa)
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
    masked = " as an AVX2-only CPU (CPUID masked: benchmarks/isa.py; this host's caches and memory)" if m.get("isa") == "avx2" else ""
    return [
        f"CPU: {m.get('cpu_model', '?')}, {m.get('cores', '?')} logical cores{masked}; flags: {' '.join(m.get('cpu_flags') or []) or '?'}",
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
