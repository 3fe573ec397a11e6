"""Never ship a wrong model, never lose a user's file (issue 18): the cases that are more than one
CLI call of the bad-input table (tests/test_bad_inputs.py): the sanity gates on the fp32 reference
and on the budgets, the export cross-check against transformers, artifact permissions and the
atomic swap, the cache leases that keep `cache prune` off a running build, and the one argument
contract both entry points share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TEST_PROFILES, make_model

from edgepipe.cli import main
from edgepipe.errors import InputError, ModelError
from edgepipe.runtime.__main__ import main as device_main
from edgepipe.runtime.manifest import BudgetCheck
from edgepipe.targets import load_target
from edgepipe.validate import Measured, check_budgets, failed


def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ---- the one budget checker: absolute KL, suspicious perplexity decrease ----


def test_kl_budget_is_checked_and_a_far_lower_perplexity_fails() -> None:
    tgt = load_target("raspberrypi5")
    assert tgt.budgets.max_kl_divergence == 0.10  # the shipped CPU profiles set it (README: 0.044 measured)
    ok = check_budgets(tgt, Measured(ppl_increase_pct=3.0, top1_agreement=0.9, kl_divergence=0.05))
    assert BudgetCheck("max_kl_divergence", 0.10, 0.05, "pass") in ok and not failed(ok)
    garbage = check_budgets(tgt, Measured(ppl_increase_pct=-2.0, top1_agreement=0.9, kl_divergence=12.5))
    assert failed(garbage) == ["max_kl_divergence"]
    better_than_reference = check_budgets(tgt, Measured(ppl_increase_pct=-60.0, top1_agreement=0.9, kl_divergence=0.05))
    assert failed(better_than_reference) == ["min_ppl_increase_pct"]  # flagged, not rewarded
    assert "comparison is broken" in (next(c for c in better_than_reference if c.status == "fail").note or "")


def test_reference_gate_refuses_a_near_uniform_reference() -> None:
    from edgepipe.validate.sanity import check_reference

    with pytest.raises(ModelError, match=r"perplexity on the eval text is 380.*uniform guess over its 384 tokens"):
        check_reference({"reference_perplexity": 380.0}, 384, allow_random_weights=False)
    with pytest.raises(ModelError, match="is inf"):
        check_reference({"reference_perplexity": float("inf")}, 384, allow_random_weights=False)
    rec = check_reference({"reference_perplexity": 380.0}, 384, allow_random_weights=True)
    assert rec["allow_random_weights"] is True and rec["uniform_perplexity"] == 384
    assert check_reference({"reference_perplexity": 101.1}, 384, allow_random_weights=False)["allow_random_weights"] is False


def test_trained_test_models_pass_the_gate_and_the_manifest_says_so(llama_artifact: Path) -> None:
    m = json.loads((llama_artifact / "manifest.json").read_text())
    s = m["sanity"]
    assert s["allow_random_weights"] is False and s["reference_perplexity"] < s["max_reference_perplexity"] < s["uniform_perplexity"]


def test_untrained_model_is_refused_unless_allowed(zoo, tmp_path: Path) -> None:
    """A random-init model builds only when the caller says so; the manifest records it."""
    model = make_model("llama", zoo.tokenizer, tmp_path / "random-llama", steps=0, seed=3)
    out = tmp_path / "out"
    args = ["build", "--model", str(model), "--target", str(TEST_PROFILES["int8-rtn"]), "--out", str(out)]  # no calibration: cheap
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and not out.exists(), res.output
    assert "near or above a uniform guess over its 384 tokens" in _one_error_line(res.output)
    res = CliRunner().invoke(main, [*args, "--allow-untrained"])
    assert res.exit_code in (0, 3), res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["sanity"]["allow_random_weights"] is True and m["sanity"]["reference_perplexity"] > 100


# ---- the export computes what PyTorch computes ----


def test_export_cross_check(zoo, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from edgepipe.export.crosscheck import crosscheck

    llama = zoo.model("llama")
    rec = crosscheck(llama, zoo.fp32("llama"), tmp_path, vocab_size=384, num_parameters=10**5)
    assert rec["top1_agreement"] == 1.0 and rec["relative_diff"] < 1e-4
    other = shutil.copytree(llama, tmp_path / "other")  # the same shapes, other weights: the export is not theirs
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * -3
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="does not compute what PyTorch does"):
        crosscheck(other, zoo.fp32("llama"), tmp_path, vocab_size=384, num_parameters=10**5)
    assert "skipped" in crosscheck(llama, zoo.fp32("llama"), tmp_path, vocab_size=384, num_parameters=10**10)


# ---- --out: permissions, atomic swap, no user file lost ----


def test_artifact_has_ordinary_permissions(llama_artifact: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    assert llama_artifact.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    for f in llama_artifact.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def _staged_copy(src: Path, out: Path, marker: str) -> Path:
    from edgepipe.package import staging_dir

    staging = staging_dir(out)
    shutil.copytree(src, staging, dirs_exist_ok=True)
    (staging / "report.md").write_text(marker)
    return staging


def test_publish_swaps_in_one_step_without_leftovers(llama_artifact: Path, tmp_path: Path) -> None:
    from edgepipe.package import publish

    out = tmp_path / "art"
    publish(_staged_copy(llama_artifact, out, "first"), out)
    publish(_staged_copy(llama_artifact, out, "second"), out)
    assert (out / "report.md").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no .art.tmp-* / .art.old-* left


def test_publish_refuses_a_file_the_user_added_during_the_build(llama_artifact: Path, tmp_path: Path) -> None:
    from edgepipe.package import publish

    out = tmp_path / "art"
    shutil.copytree(llama_artifact, out)
    staging = _staged_copy(llama_artifact, out, "new")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="now holds notes.txt"):
        publish(staging, out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.md").read_text() != "new"


def test_files_edgepipe_writes_beside_the_manifest(llama_artifact: Path, tmp_path: Path) -> None:
    """``model.sig`` (written by `sign` after the manifest) belongs to the artifact: it verifies, and a
    rebuild may replace it. A git-backed hub's ``.gitattributes`` / ``.git`` verify (the signing format
    leaves them out) but are the user's: a rebuild refuses to delete them. A killed `sign`'s
    ``model.sig.tmp`` fails verify and is replaced by the next `sign`."""
    from edgepipe.package import check_out_dir
    from edgepipe.package.signing import keygen, sign_artifact
    from edgepipe.runtime.manifest import verify_artifact

    art = tmp_path / "art"
    shutil.copytree(llama_artifact, art)
    key = keygen(tmp_path / "key").private
    (art / "model.sig.tmp").write_text("{")  # a killed `sign`
    sign_artifact(art, key)
    assert sorted(p.name for p in art.iterdir() if p.name.startswith("model.sig")) == ["model.sig"]
    verify_artifact(art)
    check_out_dir(art)  # a rebuild may replace a signed artifact
    (art / ".gitattributes").write_text("*.data filter=lfs diff=lfs merge=lfs -text\n")
    (art / ".git").mkdir()
    (art / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    verify_artifact(art)
    res = CliRunner().invoke(main, ["verify", str(art)])
    assert res.exit_code == 0, res.output
    with pytest.raises(InputError, match="did not write"):
        check_out_dir(art)


# ---- builds and `cache prune` ----


def _prune_in_another_process(cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepipe.cli", "cache", "prune", "--max-mb", "0"],
                          capture_output=True, text=True, env=dict(os.environ, EDGEPIPE_CACHE=str(cache)), timeout=120)


def test_prune_leaves_entries_and_work_folders_of_a_running_build_alone(tmp_path: Path, monkeypatch) -> None:
    from dataclasses import dataclass

    from edgepipe.cache import leases
    from edgepipe.cache_prune import prune_cache
    from edgepipe.stage import StageContext, run_cached

    @dataclass(frozen=True)
    class Cfg:
        VERSION = 1
        n: int

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))
    seen: dict[str, bool] = {}

    def produce(tmp: Path) -> dict[str, int]:
        (tmp / "data.bin").write_bytes(b"x" * 4096)
        r = _prune_in_another_process(tmp_path)  # a prune while the stage writes its work folder
        seen["work folder survived"] = r.returncode == 0 and (tmp / "data.bin").is_file()
        return {"n": 1}

    with leases():
        first = run_cached("unit", Cfg(1), produce, StageContext())
        second = run_cached("unit", Cfg(1), produce, StageContext())  # a cache hit is leased too
        r = _prune_in_another_process(tmp_path)
        assert r.returncode == 0 and "removed 0 entries" in r.stdout, r.stdout + r.stderr
        assert (first.dir / "data.bin").is_file() and second.dir == first.dir
    assert seen == {"work folder survived": True}
    assert [e["key"] for e in prune_cache(0)] == [first.key]  # the build ended: now it may go
    assert not first.dir.exists()


# ---- one argument contract: `edgepipe` and `python -m edgepipe.runtime` ----

CONTRACT = [
    (["--temperature", "nan"], "--temperature must be a finite number, not NaN or infinity"),
    (["--temperature", "-1"], "--temperature -1.0 is not in the range"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3 is not in the range 1..100000"),
    (["--top-k", "-1"], "--top-k -1 is not in the range"),
    (["--top-p", "0"], "--top-p 0.0 is not in the range (0.0, 1.0]"),
    (["--seed", "-1"], "--seed -1 is not in the range"),
]


@pytest.mark.parametrize(("flags", "message"), CONTRACT, ids=[" ".join(f) for f, _ in CONTRACT])
def test_both_entry_points_share_the_contract(llama_artifact: Path, flags: list[str], message: str, capsys) -> None:
    args = ["run", str(llama_artifact), "--prompt", "hello", *flags]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and message in _one_error_line(res.output), res.output
    capsys.readouterr()
    assert device_main(args) == 2
    err = capsys.readouterr()
    assert err.out == "" and message in _one_error_line(err.err)


@pytest.mark.parametrize(("args", "message"), [
    (["validate", "{a}", "--max-tokens", "-3"], "--max-tokens -3 is not in the range 2.."),
    (["validate", "{a}", "--max-tokens", "0"], "--max-tokens 0 is not in the range 2.."),
    (["bench", "{a}", "--threads", "-1"], "--threads -1 is not in the range 0..1024"),
    (["run", "{a}", "--prompt", "the " * 6000], "shorten the prompt"),
    (["run", "{a}", "--prompt", "caf\udce9"], "the prompt is not valid UTF-8"),
], ids=["max-tokens-negative", "max-tokens-0", "threads-negative", "prompt-too-long", "prompt-not-utf8"])
def test_device_entry_point_refuses(llama_artifact: Path, args: list[str], message: str, capsys) -> None:
    assert device_main([a.replace("{a}", str(llama_artifact)) for a in args]) == 2
    err = capsys.readouterr()
    assert err.out == "" and message in _one_error_line(err.err)


def test_device_entry_point_with_undecodable_argv(llama_artifact: Path) -> None:
    """Raw bytes on a real command line (not UTF-8) reach the runtime as surrogates: one line, exit 2."""
    cmd = [sys.executable.encode(), b"-m", b"edgepipe.runtime", b"run", bytes(llama_artifact), b"--prompt", b"caf\xe9"]
    r = subprocess.run(cmd, capture_output=True, timeout=120)
    assert r.returncode == 2 and r.stdout == b""
    assert "the prompt is not valid UTF-8" in _one_error_line(r.stderr.decode())


def test_no_home_and_no_cache_setting(tmp_path: Path) -> None:
    """HOME unset: the cache falls back to the passwd entry's home, or says to set EDGEPIPE_CACHE."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "EDGEPIPE_CACHE")}
    r = subprocess.run([sys.executable, "-m", "edgepipe.cli", "cache", "ls", "--json"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert "Traceback" not in r.stderr
    assert r.returncode == 0 or (r.returncode == 2 and "set EDGEPIPE_CACHE" in _one_error_line(r.stderr)), r.stderr


def test_prune_deletes_only_in_a_folder_marked_as_edgepipes_cache(tmp_path: Path, monkeypatch) -> None:
    """EDGEPIPE_CACHE pointing at a user's folder (a typo, $HOME): `cache prune --max-mb 0` took every
    sub-sub-folder for a stale entry and deleted it. Now prune deletes only in a folder edgepipe marked
    (CACHEDIR.TAG, written when a build creates the cache, or finds one an older edgepipe made)."""
    from dataclasses import dataclass

    from edgepipe.cache import TAG_NAME, is_marked
    from edgepipe.cache_prune import prune_cache
    from edgepipe.stage import StageContext, run_cached

    @dataclass(frozen=True)
    class Cfg:
        VERSION = 1
        n: int

    home = tmp_path / "home"
    (home / "Documents" / "letters").mkdir(parents=True)
    (home / "Documents" / "letters" / "a.txt").write_text("mine")
    monkeypatch.setenv("EDGEPIPE_CACHE", str(home))
    res = CliRunner().invoke(main, ["cache", "prune", "--max-mb", "0"])
    assert res.exit_code == 2 and "is not marked as edgepipe's cache" in _one_error_line(res.output), res.output
    run_cached("unit", Cfg(1), lambda t: None, StageContext())  # a build there does not claim the user's folder
    assert not is_marked(home) and CliRunner().invoke(main, ["cache", "prune", "--max-mb", "0"]).exit_code == 2
    assert (home / "Documents" / "letters" / "a.txt").read_text() == "mine"

    legacy = tmp_path / "legacy"  # made by an edgepipe before the tag: only its own folders
    (legacy / "export" / "0123456789abcdef01234567").mkdir(parents=True)
    (legacy / "models").mkdir()
    monkeypatch.setenv("EDGEPIPE_CACHE", str(legacy))
    run_cached("unit", Cfg(1), lambda t: None, StageContext())
    assert is_marked(legacy) and (legacy / TAG_NAME).read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert {e["stage"] for e in prune_cache(0)} == {"export", "unit"}

    fresh = tmp_path / "fresh" / "cache"  # created by the build: marked at once
    monkeypatch.setenv("EDGEPIPE_CACHE", str(fresh))
    run_cached("unit", Cfg(1), lambda t: None, StageContext())
    assert is_marked(fresh)


def test_device_entry_point_into_a_closed_pipe(llama_artifact: Path) -> None:
    """`python -m edgepipe.runtime run ... | head -c 1`: the reader goes away; no BrokenPipeError traceback."""
    cmd = f"{sys.executable} -m edgepipe.runtime run {llama_artifact} --prompt hello --max-new-tokens 300 --temperature 1 | head -c 1"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
