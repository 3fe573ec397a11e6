"""What an artifact folder may hold besides the files its manifest lists, and what else it holds.

``verify`` (:func:`edgepipe.runtime.manifest.check_artifact`) refuses any other file; a rebuild
(``edgepipe.package.folder``) replaces only what edgepipe wrote.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path, PurePosixPath


def written_beside_manifest() -> tuple[str, ...]:
    """The files edgepipe writes into an artifact that its manifest cannot list: the manifest itself
    (it cannot hash itself) and the signature ``model.sig`` (``sign`` writes it after the manifest)."""
    from edgepipe.runtime.manifest import MANIFEST_NAME  # it imports this module
    from edgepipe.runtime.signing import SIGNATURE_NAME

    return (MANIFEST_NAME, SIGNATURE_NAME)


def outside_manifest() -> tuple[str, ...]:
    """What a verified artifact may hold besides its listed files: :func:`written_beside_manifest`
    and what the signing format leaves out of a folder (``.git``, ``.gitattributes``, ...: an
    artifact fetched from a git-backed model hub carries them; the runtime never reads them)."""
    from edgepipe.runtime.signing import IGNORED

    return (*written_beside_manifest(), *IGNORED)


def unlisted_files(root: Path, allowed: Collection[str]) -> list[str]:
    """Every file under ``root`` (POSIX path; symlinks, FIFOs and sockets count, a symlinked folder
    too) whose path is not in ``allowed`` (a folder in it is skipped whole), sorted. Empty folders do not count."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        dirnames[:] = [d for d in dirnames if (rel_dir / d).as_posix().removeprefix("./") not in allowed]
        linked = [d for d in dirnames if Path(dirpath, d).is_symlink()]
        for name in filenames + linked:
            rel = (rel_dir / name).as_posix().removeprefix("./")
            if rel not in allowed:
                found.append(rel)
    return sorted(found)
