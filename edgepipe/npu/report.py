"""report.md of an NPU decoder artifact: coverage per graph (and every CPU node with QNN's
reason), accuracy on the simulator, what was measured and how. Plain text, no I/O here."""

from __future__ import annotations

from typing import Any


def _cov_lines(name: str, cov: dict[str, Any]) -> list[str]:
    lines = [
        f"- **{name}**: {cov['npu_nodes']}/{cov['total_nodes']} nodes on the NPU "
        f"({100 * cov['fraction']:.2f} %), {cov['npu_partitions']} NPU partition(s)"
    ]
    for node in cov.get("cpu_nodes") or []:
        lines.append(f"  - on the CPU: `{node['name']}` ({node['op_type']}): {node['reason']}")
    return lines


def decoder_report(model: str, target: str, htp_arch: int, metrics: dict[str, Any], failed: list[str]) -> str:
    acc = metrics["npu_accuracy"]
    ev = metrics["eval"]
    sanity = metrics["fp32_static_vs_transformers"]
    lines = [
        f"# {model} for {target} (Hexagon HTP v{htp_arch}): prefill + decode graphs",
        "",
        f"**Verdict: {'FAIL' if failed else 'PASS'}**" + (f" ({'; '.join(failed)})" if failed else ""),
        "",
        f"Static shapes: prefill 1x{metrics['seq_len']} tokens, decode 1 token over a KV cache of "
        f"{metrics['context_length']} positions. QDQ: activations {metrics['activation_type']}, weights "
        f"{metrics['weight_type']}. QNN SDK {metrics['qnn_sdk_version']} (onnxruntime-qnn "
        f"{metrics['onnxruntime_qnn_version']}).",
        "",
        "## NPU op coverage (HTP simulator, session graph after onnxruntime's optimizations)",
        "",
    ]
    for name, cov in metrics["coverage"].items():
        lines += _cov_lines(name, cov)
    ctx = metrics.get("context_binary_bytes") or {}
    lines += [
        "",
        "Context binaries: "
        + (
            ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in ctx.items())
            or "none (a graph not wholly on the NPU has no single context binary)"
        ),
    ]
    lines += [
        "",
        "## Accuracy: quantized graphs on the HTP simulator vs the fp32 static graphs on the CPU",
        "",
        f"{ev['windows']} window(s) of {ev['window_tokens']} eval tokens ({ev.get('source', 'eval text')}), "
        f"{ev['scored_positions']} positions scored: {ev['protocol']}.",
        "",
        "| phase | positions | top-1 agreement | perplexity fp32 | perplexity NPU | change | mean KL |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("all", acc)] + list((acc.get("by_phase") or {}).items())
    for phase, a in rows:
        lines.append(
            f"| {phase} | {a['positions']} | {a['top1_agreement']:.3f} | {a['reference_perplexity']:.2f} | "
            f"{a['perplexity']:.2f} | {a['ppl_increase_pct']:+.2f} % | {a['kl_divergence']:.4f} |"
        )
    lines += [
        "",
        f"Sanity, fp32 static graphs vs the transformers model ({sanity['positions']} positions): top-1 "
        f"agreement {sanity['top1_agreement']:.3f}, max |logit difference| {sanity['max_abs_logit_diff']:.2e}.",
        "",
        "Simulator time: "
        + ", ".join(f"{k} {v}" for k, v in metrics["simulator_speed"].items())
        + ". The simulator's speed says nothing about a phone's.",
        "",
    ]
    return "\n".join(lines)
