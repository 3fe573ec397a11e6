"""``edgepipe package ARTIFACT --oci OUT``: an artifact as an OCI image, written without a daemon.

The runnable image (``--platform linux/arm64`` or ``linux/amd64``) has three layers, so that a new
artifact on the same runtime ships only its own layer:

1. a Python 3.11 root filesystem: Debian bookworm's packages for that architecture unpacked with
   ``dpkg-deb -x`` (:mod:`edgepipe.devices.pyroot`, the tree the qemu runner runs in; no
   maintainer script runs, nothing is emulated);
2. the torch-free runtime: the pinned onnxruntime / numpy / tokenizers / jinja2 wheels for that platform
   and edgepipe's ``runtime/`` + ``errors.py`` in ``/usr/lib/python3/dist-packages``;
3. the artifact folder at ``/model``.

Entrypoint ``python3 -m edgepipe.runtime`` and Cmd ``run /model --prompt ...``: ``docker run IMAGE``
generates, ``docker run IMAGE verify /model`` checks the hashes, ``validate /model`` scores; when
the runtime has ``serve``, port 8080 is exposed for ``serve /model --host 0.0.0.0``.

``--model-only`` writes the artifact alone as an OCI artifact in the CNCF ModelPack form (the model
spec whose layer annotations RamaLama follows; CRI-O / Kubernetes image volumes mount it): ``artifactType``
``application/vnd.cncf.model.manifest.v1+json``, a model config, one uncompressed tar layer of the
artifact's files at the layer root (mount it at ``/model``), no root filesystem.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import ArtifactError, InputError
from edgepipe.package import oci_layout as ol
from edgepipe.runtime.manifest import Manifest, verify_artifact
from edgepipe.runtime.progress import Progress, silent

logger = logging.getLogger(__name__)

PLATFORMS = ("linux/arm64", "linux/amd64")
MODEL_DIR = "model"
SITE_DIR = "usr/lib/python3/dist-packages"
ENTRYPOINT = ("/usr/bin/python3", "-m", "edgepipe.runtime")
DEFAULT_CMD = ("run", f"/{MODEL_DIR}", "--prompt", "The capital of France is")
SERVE_PORT = 8080
ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "PYTHONDONTWRITEBYTECODE=1",  # no bytecode in the image (reproducible), none written at run time
    "PYTHONUNBUFFERED=1",
)
#: What of the Debian packages a container never reads.
ROOT_SKIP = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/bug", "usr/share/locale")
#: What ``pip --target`` leaves that does not belong in site-packages (scripts with the host's shebang).
SITE_SKIP = ("bin",)
MODEL_ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODEL_LAYER = "application/vnd.cncf.model.weight.v1.tar"


@dataclass(frozen=True)
class OciImage:
    """What ``package_oci`` wrote: the layout folder or archive, the manifest's digest (the image
    ID registries show), and each layer's digest."""

    out: Path
    manifest_digest: str
    config_digest: str
    layers: tuple[str, ...]
    platform: str | None
    model_only: bool
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "manifest_digest": self.manifest_digest, "config_digest": self.config_digest,
                "layers": list(self.layers), "platform": self.platform, "model_only": self.model_only, "bytes": self.bytes}  # fmt: skip


def package_oci(
    artifact: Path | str,
    out: Path | str,
    *,
    platform: str = "linux/arm64",
    model_only: bool = False,
    tag: str = "latest",
    progress: Progress = silent,
) -> OciImage:
    """Write ``artifact`` (verified first: a tampered artifact is never packaged) as an OCI image
    layout at ``out`` (a folder, or an archive when ``out`` ends in ``.tar``)."""
    artifact, out = Path(artifact), Path(out)
    manifest = verify_artifact(artifact)
    arch = "" if model_only else _platform_arch(platform)
    ol.check_out(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        store = ol.BlobStore(work)
        if model_only:
            mblob = _model_only(store, artifact, manifest, progress)
            extra: dict[str, Any] = {"artifactType": MODEL_ARTIFACT_TYPE}
        else:
            mblob = _runnable(store, artifact, manifest, arch, progress)
            extra = {"platform": _platform_json(arch)}
        extra["annotations"] = {ol.ANNOTATION_REF: tag}
        ol.write_layout_files(work, mblob, extra)
        index = _read_manifest(work, mblob)
        total = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
        ol.publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress(f"wrote {out} ({total / 2**20:.1f} MB, manifest {mblob.digest})")
    return OciImage(out, mblob.digest, index["config"]["digest"], tuple(d["digest"] for d in index["layers"]),
                    None if model_only else platform, model_only, total)  # fmt: skip


def _platform_arch(platform: str) -> str:
    """``linux/arm64`` (or ``linux/arm64/v8``) -> ``arm64``."""
    parts = platform.split("/")
    if len(parts) < 2 or "/".join(parts[:2]) not in PLATFORMS:
        raise InputError(f"unsupported --platform {platform!r}; use {' or '.join(PLATFORMS)}")
    return parts[1]


def _platform_json(arch: str) -> dict[str, str]:
    return {"architecture": arch, "os": "linux", **({"variant": "v8"} if arch == "arm64" else {})}


def _read_manifest(layout: Path, blob: ol.Blob) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((layout / "blobs" / "sha256" / blob.digest.split(":", 1)[1]).read_bytes())
    return data


# --------------------------------------------------------------------------- the runnable image


def _runnable(store: ol.BlobStore, artifact: Path, manifest: Manifest, arch: str, say: Progress) -> ol.Blob:
    from edgepipe.devices import pyroot
    from edgepipe.devices.qemu_env import runtime_pins

    pins = runtime_pins()
    proot = pyroot.cached_root(pyroot.deb_arch(arch), pins, say)
    say(f"layer 1/3: Debian {pyroot.SUITE} {arch} root filesystem (Python {pyroot.PYTHON})")
    root = store.put_layer(_normalized(_root_entries(proot.root)))
    say(f"layer 2/3: runtime wheels ({', '.join(f'{k} {v}' for k, v in pins.items())}) and edgepipe.runtime")
    site = store.put_layer(_normalized(_site_entries(proot.site)))
    say(f"layer 3/3: the artifact at /{MODEL_DIR}")
    model = store.put_layer(_normalized(_artifact_entries(artifact, MODEL_DIR)))
    layers = [root, site, model]
    history = [
        f"edgepipe package: Debian {pyroot.SUITE} {arch} packages {' '.join(map(str, proot.meta.get('packages', [])))}",
        f"edgepipe package: {' '.join(f'{k}=={v}' for k, v in pins.items())} and edgepipe.runtime",
        f"edgepipe package: artifact {artifact.name} at /{MODEL_DIR}",
    ]
    labels = _labels(artifact, manifest, runnable=True)
    config = store.put_json(
        {
            "created": ol.CREATED,
            **_platform_json(arch),
            "config": {"Env": list(ENV), "Entrypoint": list(ENTRYPOINT), "Cmd": list(DEFAULT_CMD), "WorkingDir": "/",
                       "Labels": labels, **_serve_config()},
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]},
            "history": [{"created": ol.CREATED, "created_by": h} for h in history],
        },
        ol.MEDIA_CONFIG,
    )  # fmt: skip
    return store.put_json(
        {"schemaVersion": 2, "mediaType": ol.MEDIA_MANIFEST, "config": config.descriptor(),
         "layers": [b.descriptor() for b in layers], "annotations": labels},
        ol.MEDIA_MANIFEST,
    )  # fmt: skip


def _serve_config() -> dict[str, Any]:
    """When the runtime has a ``serve`` command, the port it listens on is exposed and named in a
    label (``docker run -p 8080:8080 IMAGE serve /model --host 0.0.0.0``)."""
    from edgepipe.devices.provision import package_dir

    if not (package_dir() / "runtime" / "serve" / "__init__.py").is_file():
        return {}
    return {"ExposedPorts": {f"{SERVE_PORT}/tcp": {}}}


def _root_entries(root: Path) -> list[ol.Entry]:
    """The package tree, ``/usr/bin/python3``, a world-writable ``/tmp`` and the mount points a
    runtime fills (``/proc``: onnxruntime opens the model through ``/proc/self/fd``)."""
    entries = ol.tree_entries(root, "", skip=lambda rel: rel in ROOT_SKIP)
    names = {e.path for e in entries}
    if "usr/bin/python3" not in names:
        entries.append(ol.Entry("usr/bin/python3", "symlink", target="python3.11"))
    entries.append(ol.Entry("tmp", "dir", 0o1777))
    entries += [ol.Entry(d, "dir", 0o755) for d in ("proc", "sys", "dev") if d not in names]
    return entries


def _site_entries(site: Path) -> list[ol.Entry]:
    """The wheels and the device runtime (``edgepipe/__init__.py``, ``errors.py``, ``runtime/``:
    all that ``python -m edgepipe.runtime`` imports) in the image's site-packages."""
    from edgepipe.devices.provision import package_dir

    src = package_dir()

    def no_bytecode(rel: str) -> bool:
        return rel.endswith((".pyc", ".pyo")) or "__pycache__" in rel.split("/")

    entries = ol.tree_entries(site, SITE_DIR, skip=lambda rel: rel in SITE_SKIP or no_bytecode(rel))
    entries += ol.tree_entries(src / "runtime", f"{SITE_DIR}/edgepipe/runtime", skip=no_bytecode)
    entries += [ol.Entry(f"{SITE_DIR}/edgepipe/{n}", "file", 0o644, source=src / n) for n in ("__init__.py", "errors.py")]
    return entries


def _artifact_entries(artifact: Path, dest: str) -> list[ol.Entry]:
    """Every file of the artifact folder (a signature beside the manifest included); a symlink is
    refused: the image would carry a link, not the file that was verified."""
    entries = ol.tree_entries(artifact, dest)
    links = [e.path for e in entries if e.kind == "symlink"]
    if links:
        raise ArtifactError(f"{artifact} holds symbolic links ({', '.join(links[:3])}); copy the files in and rebuild")
    return entries


def _normalized(entries: list[ol.Entry]) -> list[ol.Entry]:
    """Modes that do not depend on the builder's umask: 0755 for directories and executables,
    0644 for other files (``/tmp`` keeps its 1777)."""
    out = []
    for e in entries:
        if e.kind == "file":
            mode = 0o755 if e.mode & 0o111 else 0o644
        elif e.kind == "dir":
            mode = e.mode if e.mode == 0o1777 else 0o755
        else:
            mode = 0o777
        out.append(ol.Entry(e.path, e.kind, mode, e.source, e.target))
    return out


def _labels(artifact: Path, manifest: Manifest, *, runnable: bool) -> dict[str, str]:
    what = f"edgepipe artifact {artifact.name} ({manifest.kind.value}, target {manifest.target_name or '?'})"
    labels = {
        ol.ANNOTATION_TITLE: artifact.name,
        "org.opencontainers.image.description": f"{what} with its runtime: python3 -m edgepipe.runtime run /{MODEL_DIR} --prompt TEXT"
        if runnable else f"{what}; mount it at /{MODEL_DIR} of an `edgepipe package --oci` image",
        "io.edgepipe.kind": manifest.kind.value,
        "io.edgepipe.target": manifest.target_name,
        "io.edgepipe.verdict": manifest.verdict,
    }
    return {k: v for k, v in labels.items() if v}


# --------------------------------------------------------------------------- model only


def _model_only(store: ol.BlobStore, artifact: Path, manifest: Manifest, say: Progress) -> ol.Blob:
    say(f"model-only OCI artifact: one uncompressed layer of {artifact.name}'s files")
    layer = store.put_layer(_normalized(_artifact_entries(artifact, "")), MODEL_LAYER)
    model_cfg = {"format": "onnx", "architecture": "transformer", **_quantization(manifest)}
    config = store.put_json(
        {"descriptor": {"name": artifact.name, "title": artifact.name, "vendor": "edgepipe"},
         "config": model_cfg, "modelfs": {"type": "layers", "diffIds": [layer.diff_id]}},
        MODEL_CONFIG,
    )  # fmt: skip
    labels = _labels(artifact, manifest, runnable=False)
    return store.put_json(
        {"schemaVersion": 2, "mediaType": ol.MEDIA_MANIFEST, "artifactType": MODEL_ARTIFACT_TYPE,
         "config": config.descriptor(), "layers": [layer.descriptor(annotations={ol.ANNOTATION_TITLE: artifact.name})],
         "annotations": labels},
        ol.MEDIA_MANIFEST,
    )  # fmt: skip


def _quantization(manifest: Manifest) -> dict[str, str]:
    """ModelPack's ``quantization`` / ``precision`` from the manifest (``gptq``, ``int4``), if it says."""
    quant = manifest.provenance.get("quantization")
    if not isinstance(quant, dict):
        return {}
    raw = quant.get("config")
    cfg: dict[str, Any] = raw if isinstance(raw, dict) else {}
    out = {"quantization": str(quant.get("algorithm_used") or cfg.get("algorithm") or "")}
    if cfg.get("bits"):
        out["precision"] = f"int{cfg['bits']}"
    return {k: v for k, v in out.items() if v}
