"""Artifact manifest: the device checks it before it loads anything.

An artifact is a folder; ``manifest.json`` lists every file with its sha256 and size. A
file that is missing, changed, a symlink, or a path that escapes the folder is refused,
naming the file, because a field device that runs a corrupted model is expensive to recall.

:class:`Manifest` is the one typed form of that file: packaging writes it (``to_dict``), the
runtime and the CLI read it (:func:`read_manifest` / :func:`verify_artifact`). Schema 2 added the
artifact's ``kind`` (see :mod:`edgepipe.runtime.kinds`) and moved the format marker to ``format``;
schema-1 manifests are still read, their kind derived once by ``kinds.legacy_kind``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from edgepipe.errors import ArtifactError, cannot_read
from edgepipe.runtime.kinds import ArtifactKind, legacy_kind, parse_kind
from edgepipe.runtime.threads import resolve_threads
from edgepipe.runtime.unlisted import outside_manifest, unlisted_files

if TYPE_CHECKING:
    from edgepipe.runtime.signing import SignatureCheck

MANIFEST_NAME = "manifest.json"
GENAI_CONFIG = "genai_config.json"
FORMAT = "edgepipe-artifact"
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists files and figures: anything larger is not one of ours
MAX_MANIFEST_DEPTH = 32  # ours nest 5 deep; a deeper document is not one of ours (and would cost recursion)
_CHUNK = 1 << 20
# sections the runtime reads: wrong types must be refused when read, not crash it later
_OBJECT_SECTIONS = ("target", "metrics", "source_model", "quantization", "optimize", "eval", "calibration")
_PROVENANCE = ("quantization", "optimize", "eval", "calibration", "sanity")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class BudgetCheck:
    """One budget of the target against what was measured. ``status``: pass, fail or unchecked."""

    budget: str
    limit: float
    value: float | None
    status: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"budget": self.budget, "limit": self.limit, "value": self.value, "status": self.status}
        if self.note:
            d["note"] = self.note
        return d


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, typed. ``metrics`` and the provenance sections stay JSON mappings: their
    keys differ by kind and are documented where they are measured (``edgepipe.validate``)."""

    kind: ArtifactKind
    files: Mapping[str, FileEntry]
    created: str = ""
    edgepipe_version: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    source_model: Mapping[str, Any] = field(default_factory=dict)
    target: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    budgets: tuple[BudgetCheck, ...] = ()
    verdict: str = "unknown"
    failed_budgets: tuple[str, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)  # quantization, optimize, eval, calibration, sanity
    schema_version: int = SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def target_name(self) -> str:
        return str(self.target.get("name", ""))

    def threads(self, requested: int = 0) -> int:
        """The session thread count for this artifact on this host (see ``runtime.threads``)."""
        runtime = self.target.get("runtime")
        profile = runtime.get("threads", 0) if isinstance(runtime, Mapping) else 0
        return resolve_threads(requested, profile if isinstance(profile, int) else 0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (schema ``SCHEMA_VERSION``), as written to ``manifest.json``."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind.value,
            "created": self.created,
            "edgepipe_version": self.edgepipe_version,
            "versions": dict(self.versions),
            "source_model": dict(self.source_model),
            "target": dict(self.target),
            "metrics": dict(self.metrics),
            "budgets": [b.to_dict() for b in self.budgets],
            "verdict": self.verdict,
            "failed_budgets": list(self.failed_budgets),
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in self.files.items()},
        }
        out.update({k: v for k, v in self.provenance.items() if v is not None})
        return out


def _safe_member(root: Path, rel: Any) -> Path:
    """Resolve a manifest path inside ``root``; refuse absolute paths, '..', and symlinks."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ArtifactError(f"manifest lists an invalid file name {rel!r}; rebuild the artifact")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise ArtifactError(f"manifest path {rel!r} escapes the artifact folder; refusing to load it")
    full = root.joinpath(*p.parts)
    try:
        # check each component, so that a symlinked sub-folder is caught too
        cur = root
        for part in p.parts:
            cur = cur / part
            if cur.is_symlink():
                raise ArtifactError(f"{rel} is a symlink; an artifact must hold real files (rebuild or copy it with -L)")
        full.resolve().relative_to(root.resolve())
    except ValueError:
        raise ArtifactError(f"manifest path {rel!r} escapes the artifact folder; refusing to load it") from None
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop
        raise ArtifactError(f"manifest lists an unusable file name {rel[:80]!r} ({type(e).__name__}); rebuild the artifact") from None
    return full


def json_depth(obj: Any) -> int:
    """How deeply lists / objects nest in a parsed JSON document (iterative: no recursion limit)."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return depth


def _load_json(mpath: Path) -> Any:
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{mpath} is over {MAX_MANIFEST_BYTES >> 20} MB; not an edgepipe manifest, rebuild the artifact")
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except OSError as e:
        raise ArtifactError(cannot_read("manifest", mpath, e)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({type(e).__name__}); the artifact is damaged, rebuild it") from None
    if json_depth(data) > MAX_MANIFEST_DEPTH:
        raise ArtifactError(f"{mpath} nests deeper than {MAX_MANIFEST_DEPTH} levels; not an edgepipe manifest, rebuild the artifact")
    return data


def _check_header(mpath: Path, data: dict[str, Any]) -> int:
    version = data.get("schema_version")
    marker = data.get("format") if "format" in data else data.get("kind")  # schema 1 marked itself in "kind"
    if marker != FORMAT:
        raise ArtifactError(f"{mpath} is not an edgepipe manifest (format={marker!r})")
    if isinstance(version, bool) or version not in READABLE_SCHEMAS:
        raise ArtifactError(
            f"{mpath} has schema_version {version!r}; this runtime reads versions "
            f"{', '.join(map(str, READABLE_SCHEMAS))}: upgrade edgepipe or rebuild"
        )
    return int(version)


def _check_files(root: Path, mpath: Path, files: Any) -> dict[str, FileEntry]:
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{mpath} lists no files; rebuild the artifact")
    out = {}
    for rel, entry in files.items():
        _safe_member(root, rel)
        if rel == MANIFEST_NAME:
            raise ArtifactError(f"{mpath} lists itself; rebuild the artifact")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
            or not isinstance(entry.get("size"), int)
            or isinstance(entry.get("size"), bool)
            or entry["size"] < 0
        ):
            raise ArtifactError(f"{mpath}: entry for {rel!r} needs a 64-hex sha256 and an integer size; rebuild")
        out[rel] = FileEntry(entry["sha256"], entry["size"])
    return out


def _check_sections(mpath: Path, data: dict[str, Any]) -> None:
    for section in _OBJECT_SECTIONS:
        if section in data and not isinstance(data[section], dict):
            raise ArtifactError(f"{mpath}: {section!r} must be a JSON object, got {type(data[section]).__name__}; rebuild")
    for section, sub in (("metrics", "throughput"), ("target", "runtime")):
        if sub in data.get(section, {}) and not isinstance(data[section][sub], dict):
            raise ArtifactError(f"{mpath}: '{section}.{sub}' must be a JSON object; rebuild the artifact")
    budgets = data.get("budgets", [])
    if not isinstance(budgets, list) or not all(isinstance(b, dict) and isinstance(b.get("budget"), str) for b in budgets):
        raise ArtifactError(f"{mpath}: 'budgets' must be a list of budget objects; rebuild the artifact")
    failed = data.get("failed_budgets", [])
    if not isinstance(failed, list) or not all(isinstance(f, str) for f in failed):
        raise ArtifactError(f"{mpath}: 'failed_budgets' must be a list of names; rebuild the artifact")


def _budget(b: dict[str, Any]) -> BudgetCheck:
    return BudgetCheck(b["budget"], b.get("limit"), b.get("value"), str(b.get("status", "unchecked")), b.get("note"))  # type: ignore[arg-type]


def parse_manifest(root: Path, data: Any, mpath: Path | None = None) -> Manifest:
    """Check the structure of a manifest's JSON (any readable schema) and return it typed."""
    mpath = mpath or root / MANIFEST_NAME
    if not isinstance(data, dict):
        raise ArtifactError(f"{mpath} must hold a JSON object; the artifact is damaged, rebuild it")
    version = _check_header(mpath, data)
    files = _check_files(root, mpath, data.get("files"))
    _check_sections(mpath, data)
    kind = legacy_kind(root, data) if version == 1 else parse_kind(data.get("kind"), str(mpath))
    return Manifest(
        kind=kind,
        files=files,
        created=str(data.get("created", "")),
        edgepipe_version=str(data.get("edgepipe_version", "")),
        versions=data["versions"] if isinstance(data.get("versions"), dict) else {},
        source_model=data.get("source_model", {}),
        target=data.get("target", {}),
        metrics=data.get("metrics", {}),
        budgets=tuple(_budget(b) for b in data.get("budgets", [])),
        verdict=str(data.get("verdict", "unknown")),
        failed_budgets=tuple(data.get("failed_budgets", [])),
        provenance={k: data[k] for k in _PROVENANCE if k in data},
        schema_version=version,
    )


def read_manifest(artifact: Path | str) -> Manifest:
    """Parse and structurally check ``manifest.json`` without hashing the files."""
    root = Path(artifact)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact folder (it does not exist or is a file)")
    mpath = root / MANIFEST_NAME
    if mpath.is_symlink():
        raise ArtifactError(f"{mpath} is a symlink; refusing to trust it")
    if not mpath.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST_NAME}: not an edgepipe artifact, or an incomplete one; rebuild it")
    return parse_manifest(root, _load_json(mpath), mpath)


def is_artifact(folder: Path) -> bool:
    """True when ``folder`` holds a manifest that marks it as edgepipe's (any schema; contents unchecked),
    so that a rebuild may replace it even when it is damaged."""
    mpath = Path(folder) / MANIFEST_NAME
    try:
        if mpath.is_symlink() or not mpath.is_file() or mpath.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and json_depth(data) <= MAX_MANIFEST_DEPTH and FORMAT in (data.get("format"), data.get("kind"))


def verify_artifact(artifact: Path | str, *, trusted_keys: str | None = None) -> Manifest:
    """Check the signature against the device's trusted keys (see :mod:`.signing`), then every
    listed file's size and sha256; return the manifest. Raises ArtifactError (SignatureError)."""
    return check_artifact(artifact, trusted_keys=trusted_keys)[0]


def check_artifact(artifact: Path | str, *, trusted_keys: str | None = None, hash_files: bool = True) -> tuple[Manifest, SignatureCheck]:
    """:func:`verify_artifact`, also returning what is known of the signature. The signature is
    checked first (it needs only the manifest's hashes), so a refused artifact costs no hashing.
    ``trusted_keys``: the ``--trusted-keys`` value (else the device's defaults);
    ``hash_files=False`` checks the signature against the manifest only."""
    from edgepipe.runtime.signing import check_signature  # signing reads this module
    from edgepipe.runtime.signing import trusted_keys as device_keys

    root = Path(artifact)
    m = read_manifest(root)
    signed = {rel: e.sha256 for rel, e in m.files.items()}
    signed[MANIFEST_NAME] = sha256_file(root / MANIFEST_NAME)
    sig = check_signature(root, signed, device_keys(trusted_keys))
    if hash_files:
        _check_hashes(root, m)
    return m, sig


def _check_hashes(root: Path, m: Manifest) -> None:
    extra = unlisted_files(root, {*m.files, *outside_manifest()})
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ArtifactError(
            f"{extra[0]}{more} is in {root} but not in the manifest; edgepipe did not put it there: remove it, or re-copy the artifact"
        )
    for rel, entry in m.files.items():
        path = _safe_member(root, rel)
        if not path.is_file():
            raise ArtifactError(f"{rel} is missing from {root}; the artifact is incomplete, rebuild or re-copy it")
        size = path.stat().st_size
        if size != entry.size:
            raise ArtifactError(f"{rel} has {size} bytes, the manifest says {entry.size}; re-copy the artifact")
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise ArtifactError(cannot_read("artifact file", path, e)) from None
        if digest != entry.sha256:
            raise ArtifactError(f"{rel} does not match its sha256 in the manifest; the file is corrupt, re-copy the artifact")
    check_loaded_files(root, m.files)


def _keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


def check_loaded_files(root: Path, files: Mapping[str, Any]) -> None:
    """What the runtime loads must be listed (so hashed) and may name no code to run.

    ``genai_config.json`` names the decoder graph: it must be a listed file inside the folder. A
    ``custom_ops_library`` (a shared library onnxruntime would dlopen) is refused: the runtime never
    loads code that an artifact names.
    """
    for name in (GENAI_CONFIG, "tokenizer.json"):
        if (root / name).exists() and name not in files:
            raise ArtifactError(f"{name} is in {root} but not in the manifest; refusing an unverified file, rebuild")
    if GENAI_CONFIG not in files:
        return
    try:
        cfg = json.loads((root / GENAI_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{GENAI_CONFIG} is not valid JSON ({type(e).__name__}); rebuild the artifact") from None
    if json_depth(cfg) > MAX_MANIFEST_DEPTH:
        raise ArtifactError(f"{GENAI_CONFIG} nests deeper than {MAX_MANIFEST_DEPTH} levels; rebuild the artifact")
    if any(k == "custom_ops_library" for k in _keys(cfg)):
        raise ArtifactError(
            f"{GENAI_CONFIG} names a custom_ops_library; edgepipe never loads code named by an artifact, refusing it"
        )
    model = cfg.get("model") if isinstance(cfg, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    filename = decoder.get("filename") if isinstance(decoder, dict) else None
    if filename is not None:
        _safe_member(root, filename)
        if PurePosixPath(filename).as_posix() not in files:
            raise ArtifactError(f"{GENAI_CONFIG} names the model file {filename!r}, which the manifest does not list; rebuild")


def file_entries(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file under ``root`` (sorted, POSIX paths, the manifest's JSON
    form), manifest excluded."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                continue
            if full.is_symlink():
                raise ArtifactError(f"{rel} is a symlink; artifacts hold real files only")
            out[rel] = {"sha256": sha256_file(full), "size": full.stat().st_size}
    return out
