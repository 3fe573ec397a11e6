"""``report.md``: the human-readable face of a manifest."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def budget_table(budgets: list[dict[str, Any]]) -> list[str]:
    """The "Budgets" section: every budget of the target, measured value, status and why."""
    lines = ["## Budgets", "", "| budget | limit | measured | status |", "|---|---|---|---|"]
    for c in budgets:
        lines.append(f"| {c['budget']} | {_fmt(c['limit'], 2)} | {_fmt(c['value'], 3)} | {c['status']}{' — ' + c['note'] if c.get('note') else ''} |")
    return lines


def formats_section(q: dict[str, Any], figure: str | None) -> list[str]:
    """Which format each matrix got: the allocation's budget and predicted loss, the counts, the map."""
    alloc = q.get("allocation")
    lines = ["## Weight formats", ""]
    if alloc:
        b = alloc["budget"]
        budget = f"{b['bits_per_weight']} bits/weight" if b.get("bits_per_weight") is not None else f"{b['max_mb']} MiB"
        lines.append(
            f"Allocated for a size budget of {budget}: {alloc['bytes']} of {alloc['budget_bytes']} bytes of matrices "
            f"({alloc['bits_per_weight']} bits/weight), predicted loss {_fmt(alloc['predicted_loss'], 5)} ({alloc['proxy']})."
        )
        kt = alloc.get("kernel_time")
        if kt:
            limit = b.get("max_decode_time")
            lines.append(
                "Predicted kernel time, as a fraction of the profile's base format everywhere (its `kernel_time`): "
                + ", ".join(f"{phase} {t:g}" for phase, t in kt.items()) + (f"; time budget: decode ≤ {limit:g}." if limit is not None else ".")
            )
        lines.append("")
    counts: dict[str, int] = {}
    for label in q.get("matrix_formats", {}).values():
        counts[label] = counts.get(label, 0) + 1
    lines.append(", ".join(f"{n} x {label}" for label, n in sorted(counts.items())))
    lines.append("")
    if figure:
        lines += [f"![weight format per matrix]({figure})", ""]
    return lines


def render_report(m: dict[str, Any], figures: tuple[str, ...] = ()) -> str:
    src, tgt, met = m["source_model"], m["target"], m["metrics"]
    cpu = tgt.get("cpu") or {}
    acc, thr = met.get("accuracy", {}), met.get("throughput", {})
    q = m.get("quantization", {})
    cfg = q.get("config", {})
    lines = [
        f"# {src['name']} for {tgt['name']}",
        "",
        f"**Verdict: {m['verdict'].upper()}**" + (f" (failed: {', '.join(m['failed_budgets'])})" if m["failed_budgets"] else ""),
        "",
        f"- Source: `{src['path']}` ({src['architecture']}, {src['parameters'] / 1e6:.1f}M parameters, sha256 `{src['sha256'][:16]}…`)",
        f"- Target: {tgt['name']} — {tgt['description']}"
        + (f" (alias of {tgt['alias_of']})" if tgt.get("alias_of") else "")
        + (f"; {cpu.get('cores')} x {cpu.get('model')} ({cpu.get('arch')}, {' '.join(cpu.get('isa') or []) or 'baseline ISA'})" if cpu else ""),
        f"- Quantization: int{cfg.get('bits')} weights, block {cfg.get('block_size')}, "
        f"{'symmetric' if cfg.get('symmetric') else 'asymmetric'}, accuracy_level {cfg.get('accuracy_level')}, "
        f"algorithm {q.get('algorithm_used', cfg.get('algorithm'))}; embedding / lm_head: {q.get('embedding')}; "
        f"MatMuls {q.get('matmuls')}",
        f"- Built with edgepipe {m['edgepipe_version']}, onnxruntime {m['versions'].get('onnxruntime')}, "
        f"onnxruntime-genai {m['versions'].get('onnxruntime-genai')}, transformers {m['versions'].get('transformers')}",
        "",
    ]
    if src.get("default_model"):
        lines += [
            "> Note: the default model ships as a Q4_1 GGUF, so its \"fp32\" reference already sits on a 4-bit grid;",
            "> quantization loss measured on it understates what a model trained in full precision loses.",
            "",
        ]
    lines += budget_table(m.get("budgets", []))
    ev = m.get("eval", {})
    lines += [
        "",
        f"## Accuracy (host CPU, vs the fp32 export, {ev.get('windows')} windows of {ev.get('window_tokens')} tokens of "
        f"`{ev.get('source')}`, positions {ev.get('scored_from_position', 0)}+ of each window scored)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| perplexity fp32 | {_fmt(acc.get('reference_perplexity'))} |",
        f"| perplexity quantized | {_fmt(acc.get('perplexity'))} |",
        f"| perplexity increase | {_fmt(acc.get('ppl_increase_pct'), 2)} % |",
        f"| top-1 next-token agreement | {_fmt(acc.get('top1_agreement'), 4)} |",
        f"| mean KL divergence (fp32 ‖ quantized) | {_fmt(acc.get('kl_divergence'), 5)} |",
        "",
        "## Speed and memory (host CPU — a relative figure, not the board's speed)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| artifact size | {_fmt(met.get('artifact_mb'), 1)} MB |",
        f"| prefill ({thr.get('prefill_tokens')} tokens) | {_fmt(thr.get('prefill_tok_s'), 1)} tok/s |",
        f"| decode | {_fmt(thr.get('decode_tok_s'), 1)} tok/s |",
        f"| time to first token ({thr.get('ttft_prompt_tokens')}-token prompt) | {_fmt(thr.get('ttft_ms'), 1)} ms |",
        f"| peak RSS | {_fmt(thr.get('peak_rss_mb'), 1)} MB |",
        f"| threads | {thr.get('threads')} |",
        "",
    ]
    est = met.get("estimate")
    if est:
        lines += [
            "## Estimate for the target device (before export)",
            "",
            f"{est['artifact_mb']} MB artifact, {est['peak_ram_mb']} MB peak RAM, ~{est['decode_tok_s']} tok/s decode, "
            f"~{est['prefill_tok_s']} tok/s prefill (from {est['basis']}).",
            "",
        ]
    dev = met.get("device")
    if dev:
        d = dev.get("device", {})
        lines += [
            f"## Device run: {dev.get('runner', '?')}",
            "",
            f"- Device: {d.get('machine')} {d.get('cpu_model', '')}, onnxruntime {d.get('onnxruntime')}, features: "
            f"{' '.join((d.get('cpu_features') or [])[:24])}",
            f"- What these figures claim: {dev.get('claims', '—')}",
        ]
        da = dev.get("accuracy", {})
        for k in ("eval_tokens", "perplexity", "top1_agreement", "host_top1_agreement", "kl_divergence_topk"):
            if k in da:
                lines.append(f"- {k}: {_fmt(da[k], 4)}")
        dt = dev.get("throughput") or {}
        for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb"):
            if k in dt:
                lines.append(f"- {k}: {_fmt(dt[k], 2)} (measured on the device)")
        lines.append("")
    if q.get("matrix_formats"):
        lines += formats_section(q, next(iter(figures), None))
    t = met.get("timings", {})
    lines += ["## Build", "", ", ".join(f"{k} {v}" for k, v in t.items()), ""]
    return "\n".join(lines)
