"""Artifact folders: model files, tokenizer, ``reference.npz``, ``report.md`` and ``manifest.json``
(sha256 and size of every file, provenance, metrics, budgets, verdict), assembled beside ``--out``
and published atomically."""

from edgepipe.package.folder import check_out_dir, copy_files, publish, staged, staging_dir
from edgepipe.package.manifest import now_utc, tool_versions, write_manifest

__all__ = ["check_out_dir", "copy_files", "now_utc", "publish", "staged", "staging_dir", "tool_versions", "write_manifest"]
