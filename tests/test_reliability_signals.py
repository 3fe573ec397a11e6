"""Signals at the awkward moment: SIGINT, SIGTERM or SIGKILL delivered to a real build process while it
publishes its artifact over a previous one (``edgepipe.package.folder.publish``).

The signal is sent by the build process to itself at an exact point of the publish step (a few
lines of Python run before the CLI wrap one function of ``folder`` for that), so each moment is hit
every time instead of by luck. After it, ``--out`` holds the previous artifact or the new one, whole
and verifiable, never a mix; SIGINT / SIGTERM leave nothing beside it and say which one is there;
after SIGKILL the next build sweeps what was left and publishes cleanly.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from reliability_support import TARGET, built_artifact, run_cli, shared_cache, start_build, tiny_model, use_zoo

from edgepipe.runtime.manifest import verify_artifact

OLD = "2000-01-01T00:00:00Z"  # the previous artifact's manifest says so (the manifest hashes no file of its own)

# Python run in the build process: send SIG to ourselves at MOMENT of the publish step.
PRELUDE = """
import os, signal, types
from edgepipe.package import folder
# a shell without job control starts background jobs with SIGINT ignored, and Python keeps an
# inherited SIG_IGN: give the build the disposition an interactive Ctrl-C meets
signal.signal(signal.SIGINT, signal.default_int_handler)
SIG, MOMENT = signal.{sig}, "{moment}"
def _kill():
    os.kill(os.getpid(), SIG)
def _around(name, before, after, result=None):
    real = getattr(folder, name)
    def wrapped(*a, **k):
        if before: _kill()
        r = real(*a, **k) if result is None else result
        if after: _kill()
        return r
    setattr(folder, name, wrapped)
if MOMENT == "publish-start":  # publish() has begun: the new artifact is complete, nothing swapped yet
    _around("fsync_tree", True, False)
elif MOMENT == "mid-swap":  # the exchange of old and new is the next system call
    _around("_exchange", True, False)
elif MOMENT == "after-swap":  # exchanged; the old artifact is not yet removed
    _around("_exchange", False, True)
elif MOMENT == "fallback-between":  # no RENAME_EXCHANGE: the old moved aside, the new not yet in place
    _around("_exchange", False, False, result=False)
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if os.path.basename(str(dst)) == "a":
            _kill()
    folder.os = types.SimpleNamespace(**{{**vars(os), "replace": replace}})
"""

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


@pytest.fixture(autouse=True)
def _use_conftest_zoo(zoo):
    use_zoo(zoo)


def _previous_artifact(out: Path) -> None:
    shutil.copytree(built_artifact(), out)
    m = json.loads((out / "manifest.json").read_text())
    m["created"] = OLD
    (out / "manifest.json").write_text(json.dumps(m, indent=2))


def _which(out: Path) -> str:
    m = verify_artifact(out)  # whole: every listed file there with its hash, nothing unlisted
    return "old" if m.created == OLD else "new"


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _signalled_build(tmp_path: Path, moment: str, sig: signal.Signals) -> tuple[Path, int, str]:
    out = tmp_path / "out"
    _previous_artifact(out)
    proc = start_build(tiny_model(), TARGET, out, shared_cache(), prelude=PRELUDE.format(sig=sig.name, moment=moment))
    _, err = proc.communicate(timeout=600)
    assert "Traceback" not in err, err[-3000:]
    return out, proc.returncode, err


# moment, signal -> the artifact at --out afterwards
CASES = [
    ("publish-start", signal.SIGINT, "old"),
    ("mid-swap", signal.SIGTERM, "new"),
    ("after-swap", signal.SIGKILL, "new"),
    ("fallback-between", signal.SIGKILL, "old"),  # restored from where the killed swap hid it
]
SLOW_CASES = [
    ("publish-start", signal.SIGTERM, "old"),
    ("mid-swap", signal.SIGINT, "new"),
    ("after-swap", signal.SIGINT, "new"),
    ("after-swap", signal.SIGTERM, "new"),
    ("mid-swap", signal.SIGKILL, "old"),
    ("fallback-between", signal.SIGINT, "new"),
    ("fallback-between", signal.SIGTERM, "new"),
]


@pytest.mark.parametrize(
    ("moment", "sig", "expect"),
    [*CASES, *(pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_CASES)],
    ids=[f"{m}-{s.name}" for m, s, _ in CASES + SLOW_CASES],
)
def test_signal_while_publishing(tmp_path: Path, moment: str, sig: signal.Signals, expect: str) -> None:
    out, code, err = _signalled_build(tmp_path, moment, sig)
    assert code == EXIT[sig], err[-3000:]
    if sig != signal.SIGKILL:
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, err[-3000:]
        assert ("was published to" if expect == "new" else "nothing was published") in errors[0], errors
        assert _which(out) == expect
        assert _leftovers(out) == [], "an interrupted publish left folders beside --out"
        return
    # SIGKILL cannot be held back: the exchange is atomic, and the next build starts by sweeping
    # (and by restoring an artifact a killed fallback swap hid) before anything else
    if moment != "fallback-between":
        assert _which(out) == expect
    assert _leftovers(out), "expected the killed build to leave its staging folder"
    res = run_cli("build", "--model", str(tiny_model()), "--target", TARGET, "--out", str(out), cache=shared_cache())
    assert res.returncode == 0, res.stderr[-3000:]
    assert _which(out) == "new" and _leftovers(out) == []


def test_a_bad_input_build_restores_what_a_killed_fallback_swap_hid(tmp_path: Path) -> None:
    """SIGKILL between the two renames of the fallback swap leaves no --out for a moment; the next
    build of that --out puts the previous artifact back before it checks anything, even when it then
    refuses its input."""
    out, code, _ = _signalled_build(tmp_path, "fallback-between", signal.SIGKILL)
    assert code == -signal.SIGKILL and not out.exists()
    res = run_cli("build", "--model", str(tmp_path / "no-model"), "--target", TARGET, "--out", str(out), cache=shared_cache())
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr
    assert _which(out) == "old" and _leftovers(out) == []
