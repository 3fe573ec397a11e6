"""Reading back what ``edgepipe package --oci`` wrote, independently of how it was written: the
OCI image-spec JSON schemas (v1.1.1, vendored in ``tests/data/oci-image-spec``), blob digests,
layer diff_ids, and unpacking the layers into a root folder as a container runtime would."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).parent / "data" / "oci-image-spec"


def _validator(name: str):
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    def retrieve(uri: str) -> Resource:
        # the schemas' nested `id`s move the base URI around; every $ref names a file by its basename
        return Resource.from_contents(json.loads((SCHEMAS / uri.rsplit("/", 1)[-1]).read_text()), default_specification=DRAFT4)

    schema = json.loads((SCHEMAS / name).read_text())
    return jsonschema.Draft4Validator(schema, registry=Registry(retrieve=retrieve), format_checker=jsonschema.FormatChecker())


def check_schema(name: str, doc: Any) -> None:
    errors = sorted(_validator(name).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)


def blob(layout: Path, digest: str) -> bytes:
    algo, hexdigest = digest.split(":", 1)
    data = (layout / "blobs" / algo / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} does not match its digest"
    return data


def read_layout(layout: Path) -> dict[str, Any]:
    """index, manifest and config of a one-manifest layout, every document checked against its
    schema and every descriptor's digest and size against its blob."""
    check_schema("image-layout-schema.json", json.loads((layout / "oci-layout").read_text()))
    index = json.loads((layout / "index.json").read_text())
    check_schema("image-index-schema.json", index)
    (desc,) = index["manifests"]
    manifest_bytes = blob(layout, desc["digest"])
    assert len(manifest_bytes) == desc["size"]
    manifest = json.loads(manifest_bytes)
    check_schema("image-manifest-schema.json", manifest)
    config_bytes = blob(layout, manifest["config"]["digest"])
    assert len(config_bytes) == manifest["config"]["size"]
    config = json.loads(config_bytes)
    for layer in manifest["layers"]:
        assert len(blob(layout, layer["digest"])) == layer["size"]
    return {"index": index, "descriptor": desc, "manifest": manifest, "config": config}


def layer_tar(layout: Path, layer: dict[str, Any]) -> bytes:
    data = blob(layout, layer["digest"])
    return gzip.decompress(data) if layer["mediaType"].endswith("+gzip") else data


def unpack(layout: Path, dest: Path) -> dict[str, Any]:
    """Extract the image's layers in order into ``dest``; check each diff_id on the way."""
    doc = read_layout(layout)
    diff_ids = doc["config"]["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(doc["manifest"]["layers"])
    for layer, diff_id in zip(doc["manifest"]["layers"], diff_ids, strict=True):
        raw = layer_tar(layout, layer)
        assert f"sha256:{hashlib.sha256(raw).hexdigest()}" == diff_id
        tar_path = dest.parent / f".{dest.name}.layer.tar"
        tar_path.write_bytes(raw)
        with tarfile.open(tar_path) as tar:
            assert not [m.name for m in tar.getmembers() if Path(m.name).name.startswith(".wh.")], "no whiteouts expected"
            tar.extractall(dest, filter="tar")
        tar_path.unlink()
    return doc
