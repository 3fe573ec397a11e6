"""Ray mode (``pip install 'edgepipe[cluster]'``): every stage of every cell is a Ray task.

The driver builds one task graph: per model one ``export`` task; per model and target with a size
budget one ``sensitivity`` task (the calibration pass every budget of that pair shares); per cell
``quantize`` (with optimize), ``validate`` (accuracy) and ``package`` (throughput, budgets, the
artifact), each depending on the one before. Shared stages are deduplicated here, in the driver, so
two cells never both submit them; and the stage cache's per-entry lock makes any process that does
need an entry being made elsewhere wait for it instead of making it twice.

Each task asks for 1 CPU and the stage's memory (:func:`edgepipe.estimate.stage_ram_bytes`, the
figures ``edgepipe estimate`` prints as ``build_ram_mb``), so Ray places it only on a node with that
much memory unreserved; a cell whose largest stage fits no node of the cluster fails at once.

Results travel through the shared filesystem: the stage cache (``cache:`` in the plan, else
``$EDGEPIPE_CACHE``) and ``--out`` must be the same POSIX path on every node. A task's return value
is its small table row. A worker that dies (killed, out of memory, node lost) has its task retried
by Ray (``max_retries``); the retry finds the stages before it in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from edgepipe.errors import InputError

MAX_RETRIES = 3
STAGES = ("export", "sensitivity", "quantize", "validate", "package")


def stage_task(spec: dict[str, Any], stage: str, *upstream: dict[str, Any]) -> dict[str, Any]:
    """A Ray task: one stage of one cell, unless a stage it depends on failed (then that failure)."""
    for up in upstream:
        if "error" in up:
            return up
    from edgepipe.matrix.cells import run_cell_stage

    return run_cell_stage(spec, stage)


def connect(address: str) -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'edgepipe[cluster]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(f"cannot connect to the Ray cluster at {address!r} ({str(e).splitlines()[0]}); "
                             "start one with `ray start --head` or give its address") from None
    return ray


def largest_node_memory(ray: Any) -> int:
    return max((int(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")), default=0)


def run_ray(specs: list[dict[str, Any]], address: str, say: Callable[[str], None]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(cell id, row)`` as cells finish."""
    ray = connect(address)
    biggest = largest_node_memory(ray)
    remote = ray.remote(max_retries=MAX_RETRIES)(stage_task)
    shared: dict[tuple[str, ...], Any] = {}
    finals: dict[Any, dict[str, Any]] = {}
    for spec in specs:
        need = max(spec["memory"].values())
        if need > biggest:
            yield spec["id"], {"error": f"its largest stage needs {need / 2**30:.1f} GiB of memory, the largest node of the cluster "
                                        f"offers {biggest / 2**30:.1f} GiB", "stage": "schedule"}
            continue
        finals[_submit(remote, spec, shared)] = spec
    say(f"matrix: {len(finals)} cells on the Ray cluster ({len(shared)} shared stage tasks)")
    pending = list(finals)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        spec = finals[ready[0]]
        try:
            row = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - a task that raised (a bug) or was lost: this cell fails, the others go on
            row = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}", "stage": "ray"}
        yield spec["id"], row


def _submit(remote: Any, spec: dict[str, Any], shared: dict[tuple[str, ...], Any]) -> Any:
    """The cell's task chain; the export (per model) and sensitivity (per model, target) are shared."""
    def task(stage: str, *deps: Any) -> Any:
        return remote.options(num_cpus=1, memory=spec["memory"][stage], name=f"{stage} {spec['id']}").remote(spec, stage, *deps)

    if not spec["cpu"]:  # NPU targets: one task, the whole build (its stages are cached within it)
        return remote.options(num_cpus=1, memory=max(spec["memory"].values()), name=f"build {spec['id']}").remote(spec, "package")
    def once(key: tuple[str, ...], stage: str, *deps: Any) -> Any:
        if key not in shared:
            shared[key] = task(stage, *deps)
        return shared[key]

    prev = once(("export", spec["model"]), "export")
    if spec["budgeted"]:
        prev = once(("sensitivity", spec["model"], spec["target"]), "sensitivity", prev)
    return task("package", task("validate", task("quantize", prev)))
