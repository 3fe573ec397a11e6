"""``edgepipe matrix``: the plan's checks (fast), the stage cache's per-entry lock (fast), a local
matrix with budgets and a failing cell (slow), and a real two-node Ray cluster on loopback (slow):
every cell verifies, each model's export is made once, a worker killed in a stage has its task
retried, a killed driver's rerun finishes only what was missing; no Ray process is left behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.cli import main

ROOT = Path(__file__).resolve().parent.parent


def write_plan(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from reliability_support import make_tiny_llama

    root = tmp_path_factory.mktemp("matrix-models")
    return [make_tiny_llama(root / f"m{i}", seed=i) for i in range(2)]


def fake_model(root: Path) -> Path:
    (root / "m").mkdir(parents=True, exist_ok=True)
    (root / "m" / "config.json").write_text("{}", encoding="utf-8")
    return root / "m"


BAD_PLANS = [
    ("not-a-mapping", "- m\n", "the top level must be a mapping"),
    ("unknown-key", "models: [m]\ntargets: [x86-avx2]\nmodel: [m]\n", "unknown key 'model'"),
    ("no-models", "targets: [x86-avx2]\n", "models must be a non-empty list"),
    ("empty-targets", "models: [m]\ntargets: []\n", "targets must be a non-empty list"),
    ("missing-model", "models: [nowhere]\ntargets: [x86-avx2]\n", "is not a Hugging Face model folder"),
    ("unknown-target", "models: [m]\ntargets: [no-such-board]\n", "targets[0]:"),
    ("model-twice", "models: [m, {path: m}]\ntargets: [x86-avx2]\n", "'m' appears twice"),
    ("bad-name", "models: [{path: m, name: 'a/b'}]\ntargets: [x86-avx2]\n", "name 'a/b' must be"),
    ("bad-budget", "models: [m]\ntargets: [x86-avx2]\nbudgets: [{bits: 4}]\n", "budgets[0] must be {bits_per_weight: X}"),
    ("budget-range", "models: [m]\ntargets: [x86-avx2]\nbudgets: [{max_mb: -3}]\n", "max_mb must be a number between"),
    ("budget-bool", "models: [m]\ntargets: [x86-avx2]\nbudgets: [true]\n", "budgets[0] must be"),
    ("flag", "models: [m]\ntargets: [x86-avx2]\nallow_untrained: 'yes'\n", "allow_untrained must be true or false"),
    ("url-cache", "models: [m]\ntargets: [x86-avx2]\ncache: s3://bucket/cache\n", "object storage (fsspec URLs) is not supported"),
    ("missing-calib", "models: [m]\ntargets: [x86-avx2]\ncalib: nope.txt\n", "calib:"),
    ("target-key", "models: [m]\ntargets: [{name: x86-avx2, board: pi}]\n", "unknown key 'board'"),
    ("bad-device", "models: [m]\ntargets: [{name: x86-avx2, device: floppy}]\n", "targets[0]: unknown device 'floppy'"),
    ("alias", "models: &a [m]\ntargets: *a\n", "aliases (*name) are not allowed in a matrix plan"),
    ("duplicate-key", "models: [m]\nmodels: [m]\ntargets: [x86-avx2]\n", "duplicate or unhashable key 'models'"),
    ("bad-yaml", "models: [m\n", "is not valid YAML"),
]


@pytest.mark.parametrize("name,text,expected", BAD_PLANS, ids=[c[0] for c in BAD_PLANS])
def test_a_bad_plan_is_refused_in_one_line_before_any_work(tmp_path: Path, name: str, text: str, expected: str) -> None:
    fake_model(tmp_path)
    plan = write_plan(tmp_path / "plan.yaml", text)
    res = CliRunner().invoke(main, ["matrix", str(plan), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.output
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_plan_parses_into_cells(tmp_path: Path) -> None:
    from edgepipe.matrix import load_plan

    fake_model(tmp_path)
    plan = load_plan(write_plan(tmp_path / "p.yaml", "models: [{path: m, name: a}]\ntargets: [x86-avx2, x86-avx512]\n"
                                                    "budgets: [5.5, {max_mb: 12}]\nallow_untrained: true\ncache: c\n"))
    assert [c.id for c in plan.cells()] == ["a--x86-avx2--bpw5.5", "a--x86-avx2--mb12", "a--x86-avx512--bpw5.5", "a--x86-avx512--mb12"]
    assert plan.cache == tmp_path / "c" and plan.allow_untrained


def test_stage_memory_requests_cover_granite_2b_measured_peaks() -> None:
    """Ray reserves these per task; benchmarks/RESULTS.md measured Granite-2B's stages (2.53 B parameters)."""
    from edgepipe.estimate import stage_ram_bytes

    need = stage_ram_bytes(2_533_531_648)
    measured = {"export": 6.32e9, "sensitivity": 6.72e9, "quantize": 4.24e9, "validate": 6.41e9, "package": 6.18e9}  # sensitivity: the Fisher pass, 2026-12-07
    for stage, peak in measured.items():
        assert peak <= need[stage] <= 1.5 * peak, (stage, need[stage], peak)
    assert min(stage_ram_bytes(1000).values()) >= 2**30  # python + torch + onnxruntime alone


def _produce_once(args: tuple[str, str]) -> str:
    cache, calls = args
    os.environ["EDGEPIPE_CACHE"] = cache
    from edgepipe.cache import cached_stage

    def produce(tmp: Path) -> dict[str, str]:
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (tmp / "out.txt").write_text("x")
        return {"by": str(os.getpid())}

    path, info = cached_stage("lockcheck", {"k": 1}, produce)
    assert (path / "out.txt").read_text() == "x"
    return info["by"]


def test_two_processes_needing_one_stage_make_it_once(tmp_path: Path) -> None:
    calls = tmp_path / "calls.txt"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        makers = pool.map(_produce_once, [(str(tmp_path / "cache"), str(calls))] * 3)
    assert len(calls.read_text().split()) == 1  # one produce; the others waited on the lock, then found it complete
    assert len(set(makers)) == 1
    entries = [p for p in (tmp_path / "cache" / "lockcheck").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / ".complete").is_file()  # no work folder left behind


def stage_log(out: Path) -> list[dict]:
    path = out / ".matrix" / "stages.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []


def verify_cells(doc: dict) -> None:
    from edgepipe.runtime.manifest import verify_artifact

    for row in doc["cells"]:
        if "error" not in row:
            verify_artifact(row["artifact"], trusted_keys="")


@pytest.mark.slow
def test_local_matrix_with_budgets_a_failing_cell_and_a_rerun(two_models: list[Path], tmp_path: Path) -> None:
    models = ", ".join(f"{{path: {m}, name: m{i}}}" for i, m in enumerate(two_models))
    plan = write_plan(tmp_path / "plan.yaml", f"models: [{models}]\ntargets: [x86-avx2]\n"
                                              "budgets: [6.5, 8, 1.0]\nallow_untrained: true\ncache: cache\n")
    out = tmp_path / "out"
    t0 = time.time()
    res = CliRunner().invoke(main, ["matrix", str(plan), "--out", str(out), "--jobs", "2", "--json"])
    first_s = time.time() - t0
    assert res.exit_code == 1, res.output  # the unreachable 1.0 bits/weight cells fail; the others are built
    doc = json.loads(res.stdout)
    assert sorted(doc["failed"]) == ["m0--x86-avx2--bpw1", "m1--x86-avx2--bpw1"]
    assert all("cannot be met" in r["error"] for r in doc["cells"] if "error" in r), doc["failed"]
    assert doc["built"] == 4
    verify_cells(doc)
    assert set(doc["plots"]) == {"m0--x86-avx2", "m1--x86-avx2"} and all((out / p).is_file() for p in doc["plots"].values())
    sizes = {r["cell"]: r["artifact_bytes"] for r in doc["cells"] if "error" not in r}
    assert sizes["m0--x86-avx2--bpw6.5"] < sizes["m0--x86-avx2--bpw8"]
    md = (out / "matrix.md").read_text()
    assert "4 of 6 cells built" in md and "m1--x86-avx2--bpw1" in md
    made = [s for e in stage_log(out) if e["event"] == "end" for s in e["made"]]
    assert made.count("export") == 2 and made.count("sensitivity") == 2, made  # shared by each model's budgets
    print(f"local matrix, 2 models x 3 budgets, --jobs 2: {first_s:.1f} s")

    again = CliRunner().invoke(main, ["matrix", str(plan), "--out", str(out), "--json"])
    assert again.exit_code == 1
    assert sorted(json.loads(again.stdout)["kept"]) == sorted(sizes)  # verified, not rebuilt


# --- a real Ray cluster on loopback --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_processes(pgids: set[int]) -> list[int]:
    """Live (not zombie) processes of these process groups."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) in pgids:
            found.append(int(d.name))
    return found


class RayCluster:
    """A head node and a worker node, each `ray start` in a session of its own (so that every process
    Ray starts, workers included, can be found by its process group and stopped by pid)."""

    def __init__(self, root: Path):
        self.root, self.port, self.pgids = root, free_port(), set()
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                    "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port())]

    def start(self, name: str, head: bool) -> None:
        where = ["--head", "--port", str(self.port), "--include-dashboard", "false", "--ray-client-server-port", str(free_port())] if head \
            else ["--address", self.address]
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", *where, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
               "--temp-dir", str(self.root / name), "--disable-usage-stats", *self._ports()]
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.pgids.add(proc.pid)
        log = proc.communicate(timeout=120)[0].decode(errors="replace")
        assert proc.returncode == 0, log[-3000:]

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in group_processes(self.pgids):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 15
            while group_processes(self.pgids) and time.time() < deadline:
                time.sleep(0.3)
        assert not group_processes(self.pgids), "Ray processes survived the clean-up"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("ray")
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.start("head", head=True)
        cluster.start("worker", head=False)
        yield cluster
    finally:
        cluster.stop()


def start_driver(cluster: RayCluster, plan: Path, out: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "edgepipe.cli", "matrix", str(plan), "--ray", cluster.address, "--out", str(out), "--json"]
    return subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(cond, timeout: float, what: str) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_ray_matrix_shares_exports_survives_a_killed_worker_and_a_killed_driver(ray_cluster: RayCluster, two_models: list[Path],
                                                                                tmp_path: Path) -> None:
    models = ", ".join(f"{{path: {m}, name: m{i}}}" for i, m in enumerate(two_models))
    plan = write_plan(tmp_path / "plan.yaml", f"models: [{models}]\ntargets: [x86-avx2, x86-avx512]\nallow_untrained: true\ncache: cache\n")
    out, t0 = tmp_path / "out", time.time()

    # 1. the 2 x 2 matrix; the worker running the first `package` task is killed in that stage
    driver = start_driver(ray_cluster, plan, out)
    victim = wait_for(lambda: next((e for e in stage_log(out) if e["stage"] == "package" and e["event"] == "start"), None), 600, "a package task")
    os.kill(victim["pid"], signal.SIGKILL)
    stdout, stderr = driver.communicate(timeout=900)
    first_s = time.time() - t0
    assert driver.returncode == 0, stderr[-4000:]
    doc = json.loads(stdout)
    assert doc["built"] == 4 and not doc["failed"]
    verify_cells(doc)
    log = stage_log(out)
    assert not any(e["pid"] == victim["pid"] and e["t"] > victim["t"] for e in log), "the kill landed after the stage ended"
    retried = [e for e in log if e["cell"] == victim["cell"] and e["stage"] == "package"]
    assert [e["event"] for e in retried] == ["start", "start", "end"] and retried[-1]["pid"] != victim["pid"], retried
    made = [s for e in log if e["event"] == "end" for s in e["made"]]
    assert made.count("export") == 2, made  # once per model, shared by both targets
    exports = [p for p in (tmp_path / "cache" / "export").iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]
    assert len(exports) == 2
    assert len({e["pid"] for e in log}) >= 2  # tasks ran in more than one worker

    # 2. a matrix of budgets (same cache: the exports are found there) whose driver is killed once a
    #    cell is done; the rerun keeps the finished cells and builds only the rest
    plan2 = write_plan(tmp_path / "plan2.yaml", f"models: [{models}]\ntargets: [x86-avx2]\nbudgets: [6.5, 8]\n"
                                                "allow_untrained: true\ncache: cache\n")
    out2, t1 = tmp_path / "out2", time.time()
    driver = start_driver(ray_cluster, plan2, out2)
    first_done = wait_for(lambda: [e["cell"] for e in stage_log(out2) if e["stage"] == "package" and e["event"] == "end"], 600, "a finished cell")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.communicate(timeout=60)
    killed_at = time.time()
    finished = {e["cell"] for e in stage_log(out2) if e["stage"] == "package" and e["event"] == "end"}
    assert first_done and len(finished) < 4
    rerun = start_driver(ray_cluster, plan2, out2)
    stdout, stderr = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, stderr[-4000:]
    doc = json.loads(stdout)
    assert set(doc["kept"]) >= finished and doc["built"] == 4
    verify_cells(doc)
    assert set(doc["plots"]) == {"m0--x86-avx2", "m1--x86-avx2"}  # two budgets per model and target: the Pareto plots
    assert not [s for e in stage_log(out2) if e["event"] == "end" for s in e["made"] if s == "export"]  # found in the shared cache
    restarted = {e["cell"] for e in stage_log(out2) if e["t"] > killed_at and e["event"] == "start"}
    assert not restarted & finished, (restarted, finished)
    print(f"ray matrix 2 x 2 with a killed worker: {first_s:.1f} s; killed driver + rerun: {time.time() - t1:.1f} s")
