"""``report.md`` of the NPU artifacts (decoder and encoder): coverage per graph with every CPU node
and QNN's reason, the budgets as checked, accuracy on the simulator, and what was measured how.
Plain text from the manifest's figures, no I/O here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgepipe.package.report import budget_table
from edgepipe.runtime.manifest import BudgetCheck

SIMULATOR_NOTE = "The simulator's speed says nothing about a phone's."


def _verdict(budgets: Sequence[BudgetCheck]) -> str:
    failed = [c for c in budgets if c.status == "fail"]
    if not failed:
        return "**Verdict: PASS**"
    why = [f"{c.budget}: {c.note}" if c.note else f"{c.budget}: {c.value} vs limit {c.limit}" for c in failed]
    return f"**Verdict: FAIL** ({'; '.join(why)})"


def _cov_lines(name: str, cov: Mapping[str, Any]) -> list[str]:
    lines = [
        f"- **{name}**: {cov['npu_nodes']}/{cov['total_nodes']} nodes on the NPU "
        f"({100 * cov['fraction']:.2f} %), {cov['npu_partitions']} NPU partition(s)"
    ]
    for node in cov.get("cpu_nodes") or []:
        lines.append(f"  - on the CPU: `{node['name']}` ({node['op_type']}): {node['reason']}")
    return lines


def _coverage_section(coverage: Mapping[str, Mapping[str, Any]], binaries: Mapping[str, Any]) -> list[str]:
    lines = ["## NPU op coverage (HTP simulator, session graph after onnxruntime's optimizations)", ""]
    for name, cov in coverage.items():
        lines += _cov_lines(name, cov)
    listed = ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in binaries.items() if v)
    lines += ["", "Context binaries: " + (listed or "none (a graph not wholly on the NPU has no single context binary)"), ""]
    return lines


def _header(model: str, target: str, htp_arch: int, what: str, budgets: Sequence[BudgetCheck], metrics: Mapping[str, Any]) -> list[str]:
    return [
        f"# {model} for {target} (Hexagon HTP v{htp_arch}){what}",
        "",
        _verdict(budgets),
        "",
        f"QDQ: activations {metrics['activation_type']}, weights {metrics['weight_type']}. QNN SDK "
        f"{metrics['qnn_sdk_version']} (onnxruntime-qnn {metrics['onnxruntime_qnn_version']}).",
        "",
    ]


def decoder_report(model: str, target: str, htp_arch: int, metrics: Mapping[str, Any], budgets: Sequence[BudgetCheck]) -> str:
    acc, ev, sanity = metrics["npu_accuracy"], metrics["eval"], metrics["fp32_static_vs_transformers"]
    lines = _header(model, target, htp_arch, ": prefill + decode graphs", budgets, metrics)
    lines += [
        f"Static shapes: prefill 1x{metrics['seq_len']} tokens, decode 1 token over a KV cache of "
        f"{metrics['context_length']} positions.",
        "",
    ]
    lines += _coverage_section(metrics["coverage"], metrics.get("context_binary_bytes") or {})
    lines += budget_table([c.to_dict() for c in budgets])
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
    by_phase = acc.get("by_phase") or {}
    for phase, a in [("all", acc), *((p, by_phase[p]) for p in ("prefill", "decode") if p in by_phase)]:
        lines.append(
            f"| {phase} | {a['positions']} | {a['top1_agreement']:.3f} | {a['reference_perplexity']:.2f} | "
            f"{a['perplexity']:.2f} | {a['ppl_increase_pct']:+.2f} % | {a['kl_divergence']:.4f} |"
        )
    lines += [
        "",
        f"Sanity, fp32 static graphs vs the transformers model ({sanity['positions']} positions): top-1 "
        f"agreement {sanity['top1_agreement']:.3f}, max |logit difference| {sanity['max_abs_logit_diff']:.2e}.",
        "",
        "Simulator time: " + ", ".join(f"{k} {v}" for k, v in metrics["simulator_speed"].items()) + ". " + SIMULATOR_NOTE,
        "",
    ]
    return "\n".join(lines)


def encoder_report(model: str, target: str, htp_arch: int, metrics: Mapping[str, Any], budgets: Sequence[BudgetCheck]) -> str:
    lines = _header(model, target, htp_arch, ": sentence-embedding encoder", budgets, metrics)
    lines += [f"Static shape: 1x{metrics['seq_len']} tokens.", ""]
    lines += _coverage_section({"model": metrics["coverage"]}, {"model": metrics.get("context_binary_bytes")})
    lines += budget_table([c.to_dict() for c in budgets])
    retrieval = metrics.get("retrieval_top1_agreement")
    lines += [
        "",
        "## Accuracy: the QDQ graph on the HTP simulator vs the fp32 graph on the CPU",
        "",
        f"{metrics['eval_sentences']} eval sentences ({metrics.get('eval_source', 'eval set')}; "
        f"{metrics.get('eval_truncated', 0)} truncated to {metrics['seq_len']} tokens): cosine min "
        f"{metrics['cosine_min']:.4f}, mean {metrics['cosine_mean']:.4f}"
        + (f"; nearest-neighbour top-1 agreement {retrieval:.3f}, top-5 overlap {metrics['retrieval_top5_overlap']:.3f}" if retrieval is not None else "")
        + ".",
        "",
        f"Graph rewrites: {metrics.get('rewrites')}. " + SIMULATOR_NOTE,
        "",
    ]
    return "\n".join(lines)
