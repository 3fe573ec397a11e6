"""``edgepipe matrix``: models x targets x size budgets, built locally (a bounded number of processes)
or on a Ray cluster (one task per stage), into one results table and an artifact per cell.

    OUT/cells/<model>--<target>[--bpw5.5|--mb120]/   the cell's artifact (as ``edgepipe build`` writes it)
    OUT/matrix.json, OUT/matrix.md                    one row per cell (size, PPL, KL, top-1, tok/s, verdict or error)
    OUT/pareto-<model>--<target>.png                  when a model and target were built at several budgets
    OUT/.matrix/stages.jsonl                          which task ran which stage where, made or found cached

A cell that fails is reported in the table and the others go on. Run the same command again after
the driver was killed: a cell whose artifact is in place, verifies (every file's sha256 against its
manifest) and was built from the same model for the same target and budget is kept, not rebuilt;
the others find their finished stages in the stage cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import EdgepipeError, InputError
from edgepipe.matrix.plan import Cell, Plan, load_plan
from edgepipe.runtime.progress import Progress, silent

__all__ = ["MatrixResult", "Plan", "load_plan", "run_matrix"]


@dataclass(frozen=True)
class MatrixResult:
    out: Path
    rows: tuple[dict[str, Any], ...]  # one per cell, in the plan's order
    reused: tuple[str, ...]  # cells whose verified artifacts were kept
    failed: tuple[str, ...]  # cells not built (the row says why)
    failed_budgets: tuple[str, ...]  # cells built with a failed budget

    @property
    def exit_code(self) -> int:
        """0: every cell built and passed; 3: built, some budget failed; 1: some cell could not be built."""
        return 1 if self.failed else (3 if self.failed_budgets else 0)


def run_matrix(
    plan: Plan | Path | str, *, out: Path | str | None = None, ray: str | None = None, jobs: int = 1, progress: Progress | None = None,
) -> MatrixResult:
    """Build every cell of ``plan`` into ``out`` (default: ``<plan>.out`` beside the plan file).

    ``ray``: a Ray cluster address (``auto``: the one this machine belongs to), else local processes,
    at most ``jobs`` at a time. Raises InputError before any work on a bad plan."""
    from edgepipe.matrix.table import write_results
    from edgepipe.models import cache_root

    say = progress or silent
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    if not 1 <= jobs <= 256:
        raise InputError(f"--jobs must be between 1 and 256, got {jobs}")
    where = Path(out) if out is not None else plan.source.with_name(plan.source.stem + ".out")
    where = where.absolute()
    cache = (plan.cache or cache_root()).absolute()
    with _driver_lock(where):
        rows, todo, reused = _plan_cells(plan, where, cache, say)
        say(f"matrix: {len(rows) + len(todo)} cells; {len(reused)} already built and verified, {len(todo)} to build")
        if todo:
            for cell_id, row in _execute(todo, ray, jobs, say):
                rows[cell_id] = _complete_row(row, next(s for s in todo if s["id"] == cell_id))
                say(f"matrix: {cell_id}: " + (f"failed in {row.get('stage')}: {row['error']}" if "error" in row else row["verdict"]))
        ordered = [rows[c.id] for c in plan.cells()]
        doc = write_results(where, plan.source, ordered, reused)
    return MatrixResult(where, tuple(ordered), tuple(reused), tuple(doc["failed"]), tuple(doc["failed_budgets"]))


def _execute(todo: list[dict[str, Any]], ray: str | None, jobs: int, say: Progress) -> Iterator[tuple[str, dict[str, Any]]]:
    if ray:
        from edgepipe.matrix.cluster import run_ray

        return run_ray(todo, ray, say)
    from edgepipe.matrix.local import run_local

    return run_local(todo, jobs, say)


@contextlib.contextmanager
def _driver_lock(out: Path) -> Iterator[None]:
    """One driver per ``--out``; the folders it writes."""
    from edgepipe.matrix.cells import CELLS_DIR, STATE_DIR

    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        (out / CELLS_DIR).mkdir(exist_ok=True)
        fd = os.open(out / STATE_DIR / "driver.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"cannot write the matrix folder {out} ({e.strerror}); give a writable --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"another `edgepipe matrix` is running on {out}; wait for it or give another --out") from None
        yield
    finally:
        os.close(fd)


def _plan_cells(plan: Plan, out: Path, cache: Path, say: Progress) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Each cell's spec, or its row when it is already built (verified) or its model was refused."""
    from edgepipe.matrix.cells import cell_spec, finished_row

    facts = {m.name: _model_facts(m.path) for m in plan.models}
    rows: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    reused: list[str] = []
    for cell in plan.cells():
        f = facts[cell.model.name]
        if "error" in f:
            rows[cell.id] = _error_row(cell, f["error"], "plan")
            continue
        spec = cell_spec(cell, plan, out, cache, f["memory"])
        spec.update(_target_facts(cell))
        done = finished_row(spec, f["sha256"])
        if done is not None:
            rows[cell.id] = done
            reused.append(cell.id)
            say(f"matrix: {cell.id}: built and verified, kept")
        else:
            todo.append(spec)
    return rows, todo, reused


def _model_facts(path: Path) -> dict[str, Any]:
    """From the model folder alone (seconds): its hash, and each build stage's memory from ``estimate``."""
    from edgepipe.estimate import stage_ram_bytes
    from edgepipe.export import inspect_model
    from edgepipe.export.preflight import preflight

    try:
        pre = preflight(path)
        pre.raise_if_refused()
        info = inspect_model(path, supported={pre.architecture: pre.path})
    except EdgepipeError as e:
        return {"error": str(e).splitlines()[0]}
    return {"sha256": info.sha256, "memory": stage_ram_bytes(info.num_parameters, pre.path)}


def _target_facts(cell: Cell) -> dict[str, Any]:
    from edgepipe.targets import load_target

    t = load_target(cell.target.name)
    q = t.quantization
    return {
        "cpu": t.runtime.execution_provider == "CPUExecutionProvider",
        "budgeted": cell.budget is not None or q.bits_per_weight is not None or q.max_mb is not None,
    }


def _error_row(cell: Cell, error: str, stage: str) -> dict[str, Any]:
    return {"cell": cell.id, "model": cell.model.name, "target": cell.target.label, "error": error, "stage": stage,
            "budget": {"bits_per_weight": cell.budget.bits_per_weight, "max_mb": cell.budget.max_mb} if cell.budget else None}


def _complete_row(row: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    if "error" not in row:
        return row
    b = {"bits_per_weight": spec["bits_per_weight"], "max_mb": spec["max_mb"]} if spec["bits_per_weight"] or spec["max_mb"] else None
    return {"cell": spec["id"], "model": spec["model_name"], "target": spec["target_label"], "budget": b, **row}
