"""Fuzz the manifest and target-profile parsers: any input either loads to a valid object or raises
one of the project's own errors (EdgepipeError subclasses), never another exception."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepipe.errors import ArtifactError, EdgepipeError, TargetError
from edgepipe.runtime.kinds import ArtifactKind
from edgepipe.runtime.manifest import FORMAT, SCHEMA_VERSION, Manifest, file_entries, read_manifest, verify_artifact
from edgepipe.targets import Target, load_target, parse_target

ROOT = Path(__file__).resolve().parent.parent
GOOD_TARGET = yaml.safe_load((ROOT / "targets" / "x86-avx2.yaml").read_text())
NPU_TARGET = yaml.safe_load((ROOT / "targets" / "snapdragon-8gen3.yaml").read_text())

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", "..", "../x", "/etc/passwd", "a\x00b", "ü" * 300, "4", "rtn", "aarch64", "CPUExecutionProvider"]),
)
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=20
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw, base: Any) -> Any:
    """``base`` with a few leaves or sub-trees replaced, deleted or given an extra key."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(obj)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if action == "replace":
                obj = draw(json_values)
            continue
        parent = obj
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent[key], dict):
            parent[key][draw(st.text(max_size=10))] = draw(json_values)
    return obj


def _check_target(data: Any) -> None:
    try:
        t = parse_target(data)
    except TargetError:
        return
    assert isinstance(t, Target)
    assert t.quantization.block_size in (16, 32, 64, 128, 256)
    json.dumps(t.to_dict())  # the parsed profile goes into every manifest


@FUZZ
@given(json_values)
def test_parse_target_random_data(data):
    _check_target(data)


@FUZZ
@given(st.one_of(mutated(GOOD_TARGET), mutated(NPU_TARGET)))
def test_parse_target_mutated_profiles(data):
    _check_target(data)


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                 mutated(GOOD_TARGET).map(lambda d: yaml.safe_dump(d, allow_unicode=True))))
def test_load_target_file_text(text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.yaml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            t = load_target(str(p))
        except TargetError:
            return
        assert isinstance(t, Target)


@FUZZ
@given(st.text(max_size=400))
def test_load_target_any_name(name):
    try:
        load_target(name)
    except TargetError:
        pass


# ---- manifests ----

def _artifact(d: Path) -> dict:
    (d / "model.onnx").write_bytes(b"onnx" * 10)
    (d / "sub").mkdir()
    (d / "sub" / "x.bin").write_bytes(b"\x00" * 7)
    m = {"format": FORMAT, "kind": "cpu-decoder", "schema_version": SCHEMA_VERSION, "files": file_entries(d), "metrics": {"throughput": {"peak_rss_mb": 1}}}
    return m


def _check_manifest(text: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        _artifact(root)
        (root / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        for fn in (read_manifest, verify_artifact):
            try:
                m = fn(root)
            except ArtifactError:
                continue
            except EdgepipeError as e:  # pragma: no cover - a different project error is still a bug here
                raise AssertionError(f"{fn.__name__} raised {type(e).__name__}, not ArtifactError") from e
            assert isinstance(m, Manifest) and isinstance(m.kind, ArtifactKind) and isinstance(m.files, dict) and m.files


with tempfile.TemporaryDirectory() as _d:
    GOOD_MANIFEST = _artifact(Path(_d))


@FUZZ
@given(json_values)
def test_manifest_random_json(data):
    _check_manifest(json.dumps(data))


@FUZZ
@given(mutated(GOOD_MANIFEST))
def test_manifest_mutated(data):
    _check_manifest(json.dumps(data))


@FUZZ
@given(st.binary(max_size=200))
def test_manifest_random_bytes(raw):
    _check_manifest(raw)


def test_good_manifest_verifies():
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        m = _artifact(root)
        (root / "manifest.json").write_text(json.dumps(m))
        assert verify_artifact(root).files.keys() == {"model.onnx", "sub/x.bin"}
