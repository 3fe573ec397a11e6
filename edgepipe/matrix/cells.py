"""One cell of a matrix, as a worker runs it: a stage (into the stage cache) or the whole build (the
artifact), with a line in the matrix's stage log for each start and end.

A cell travels as a plain JSON-able ``spec`` (paths as strings), so the same code runs in a local
subprocess and in a Ray task on another node. The stage log, ``OUT/.matrix/stages.jsonl``, is
appended with one ``write`` per line; it records which stages each task made and which it found in
the cache (from the cache's own ``made`` / ``cached`` progress lines), its process, host and wall time.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from edgepipe.errors import EdgepipeError

STAGE_LOG = "stages.jsonl"
STATE_DIR = ".matrix"
CELLS_DIR = "cells"
_EVENT = re.compile(r"^([a-z][a-z0-9-]*): (made|cached|made by another build) \(")


def cell_spec(cell: Any, plan: Any, out: Path, cache: Path, memory: dict[str, int]) -> dict[str, Any]:
    b = cell.budget
    return {
        "id": cell.id, "model_name": cell.model.name, "model": str(cell.model.path), "target": cell.target.name,
        "target_label": cell.target.label, "device": cell.target.device,
        "bits_per_weight": b.bits_per_weight if b else None, "max_mb": b.max_mb if b else None,
        "calib": str(plan.calib) if plan.calib else None, "eval": str(plan.eval_file) if plan.eval_file else None,
        "allow_untrained": plan.allow_untrained, "cache": str(cache), "artifact": str(out / CELLS_DIR / cell.id),
        "log": str(out / STATE_DIR / STAGE_LOG), "memory": memory,
    }


def log_event(spec: dict[str, Any], record: dict[str, Any]) -> None:
    line = json.dumps({"cell": spec["id"], "pid": os.getpid(), "host": socket.gethostname(), "t": round(time.time(), 3), **record}) + "\n"
    fd = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run_cell_stage(spec: dict[str, Any], stage: str) -> dict[str, Any]:
    """Run ``stage`` of the cell (``package``: the whole build, earlier stages found in the cache).
    Returns the cell's table row for ``package``, ``{}`` for the others, ``{"error": ...}`` when the
    stage refused or failed for a reason of its own (an :class:`EdgepipeError`): the matrix reports it."""
    os.environ["EDGEPIPE_CACHE"] = spec["cache"]
    events: dict[str, list[str]] = {"made": [], "cached": []}

    def say(msg: str) -> None:
        m = _EVENT.match(msg)
        if m:
            events["cached" if m.group(2) != "made" else "made"].append(m.group(1))
        print(f"[{spec['id']} {stage}] {msg}", file=sys.stderr, flush=True)

    log_event(spec, {"stage": stage, "event": "start"})
    t0 = time.time()
    try:
        row = _run(spec, stage, say)
    except EdgepipeError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        log_event(spec, {"stage": stage, "event": "error", "error": msg, "wall_s": round(time.time() - t0, 2), **events})
        return {"error": msg, "stage": stage, "exit_code": e.exit_code}
    log_event(spec, {"stage": stage, "event": "end", "wall_s": round(time.time() - t0, 2), **events, **_peak_rss()})
    return row


def _peak_rss() -> dict[str, float]:
    """Peak RSS so far of this process and of its largest finished child (the builder's export, the
    benchmark), MiB. A reused worker's figure covers its earlier tasks too: an upper bound."""
    import resource

    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_child_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def _run(spec: dict[str, Any], stage: str, say: Any) -> dict[str, Any]:
    common = dict(
        target=spec["target"], model=spec["model"], calib=spec["calib"], eval_file=spec["eval"], progress=say,
        allow_random_weights=spec["allow_untrained"], bits_per_weight=spec["bits_per_weight"], max_mb=spec["max_mb"],
    )
    if stage != "package":
        from edgepipe.pipeline import run_stages

        run_stages(stop_after=stage, **common)
        return {}
    from edgepipe.pipeline import build

    res = build(out=spec["artifact"], device=spec["device"], **common)
    return cell_row(spec, res)


def cell_row(spec: dict[str, Any], res: Any) -> dict[str, Any]:
    """The cell's line of the results table: the search's point (size, PPL, KL, top-1, tok/s, verdict)."""
    from edgepipe.search import point_row

    m = res.manifest.to_dict()
    bpw = spec["bits_per_weight"]
    if bpw is None:  # a max_mb budget or the profile's own: the bits per weight the build reached
        bpw = m["quantization"].get("allocation", {}).get("bits_per_weight") or m["metrics"].get("estimate", {}).get("bits_per_weight")
    row = point_row(bpw, res.artifact, res)
    return {
        "cell": spec["id"], "model": spec["model_name"], "target": spec["target_label"], "device": spec["device"],
        "budget": {"bits_per_weight": spec["bits_per_weight"], "max_mb": spec["max_mb"]} if spec["bits_per_weight"] or spec["max_mb"] else None,
        **row, "passed": bool(res.passed),
    }


def finished_row(spec: dict[str, Any], source_sha256: str) -> dict[str, Any] | None:
    """The row of a cell whose artifact is already complete at its place: it verifies (every file's
    size and sha256 against its manifest) and was built from this model for this target and budget."""
    from edgepipe.errors import ArtifactError
    from edgepipe.pipeline import BuildResult
    from edgepipe.runtime.manifest import verify_artifact

    art = Path(spec["artifact"])
    if not (art / "manifest.json").is_file():
        return None
    try:
        m = verify_artifact(art, trusted_keys="")
    except ArtifactError:
        return None
    d = m.to_dict()
    q = d.get("target", {}).get("quantization", {})
    same = (d.get("source_model", {}).get("sha256") == source_sha256 and m.target_name == _target_name(spec)
            and (spec["bits_per_weight"] is None or q.get("bits_per_weight") == spec["bits_per_weight"])
            and (spec["max_mb"] is None or q.get("max_mb") == spec["max_mb"]))
    if not same:
        return None
    return cell_row(spec, BuildResult(artifact=art, manifest=m, passed=m.verdict == "pass", failed_budgets=list(m.failed_budgets)))


def _target_name(spec: dict[str, Any]) -> str:
    from edgepipe.targets import load_target

    return load_target(spec["target"]).name


def main(argv: list[str]) -> int:
    """``python -m edgepipe.matrix.cells SPEC.json RESULT.json``: a local matrix's worker process."""
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    row = run_cell_stage(spec, "package")
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(row, default=str), encoding="utf-8")
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
