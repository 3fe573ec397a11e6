"""Making signing keys and signing artifacts (the format: :mod:`edgepipe.runtime.signing`).

A signature covers every file of the artifact folder, ``manifest.json`` included, so neither a
file nor the manifest's hashes can change without the device noticing. Keys are ECDSA P-256 in
PEM, the kind ``model_signing``'s "private key" method uses (``openssl ecparam -name prime256v1``
makes the same). The private key stays on the build host; devices get the ``.pub``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError, cannot_read
from edgepipe.runtime.manifest import MANIFEST_NAME, check_artifact, is_artifact, sha256_file
from edgepipe.runtime.signing import SIGNATURE_NAME, bundle, ecdsa_for, key_id, pae, statement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyPair:
    """Where ``edgepipe keygen`` wrote a key pair, and the public key's id (sha256 of its PEM)."""

    private: Path
    public: Path
    key_id: str


@dataclass(frozen=True)
class Signed:
    """An artifact signed by ``sign_artifact``: the signature file, the key id, how many files it covers."""

    artifact: Path
    signature: Path
    key_id: str
    files: int


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise InputError("signing needs the cryptography package: pip install 'cryptography==50.0.2'") from None
    return serialization


def keygen(out: Path | str, *, force: bool = False) -> KeyPair:
    """Write a new P-256 private key to ``out`` (mode 0600) and its public key to ``out.pub``."""
    serialization = _crypto()
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(out)
    public = private.with_name(private.name + ".pub")
    for p in (private, public):
        if p.exists() and not force:
            raise InputError(f"{p} exists; choose another --out or pass --force to replace the key pair")
    if not private.parent.is_dir():
        raise InputError(f"folder {private.parent} does not exist")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(private, public, key_id(key.public_key()))


def load_private_key(path: Path | str) -> Any:
    """An EC private key from a PEM file (unencrypted), refused with a one-line reason otherwise."""
    serialization = _crypto()
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block
        raise InputError(f"signing key {path} is not a regular file (a folder, a pipe or a device); pass a PEM file")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise InputError(cannot_read("signing key", path, e)) from None
    except (ValueError, TypeError) as e:
        raise InputError(f"{path} is not an unencrypted PEM private key ({str(e)[:80]}); make one with `edgepipe keygen`") from None
    ecdsa_for(key.public_key())
    return key


def sign_artifact(artifact: Path | str, key_path: Path | str) -> Signed:
    """Check the artifact against its manifest, then write ``model.sig`` over all its files.

    The folder must hold only what the manifest lists (plus an older ``model.sig``): a signature
    over a file the manifest does not know would be refused on the device anyway."""
    root = Path(artifact)
    key = load_private_key(key_path)
    tmp = root / (SIGNATURE_NAME + ".tmp")
    if is_artifact(root) and tmp.is_file() and not tmp.is_symlink():
        tmp.unlink()  # what a killed `sign` left: ours, and rewritten below
    # hashes, and no file the manifest does not list; the host's own keys do not matter
    manifest, _ = check_artifact(root, trusted_keys="")
    resources = {rel: e.sha256 for rel, e in manifest.files.items()}
    resources[MANIFEST_NAME] = sha256_file(root / MANIFEST_NAME)
    payload = json.dumps(statement(root.resolve().name, resources), indent=2).encode()
    public = key.public_key()
    kid = key_id(public)
    doc = bundle(payload, key.sign(pae(payload), ecdsa_for(public)), kid)
    out = root / SIGNATURE_NAME
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    logger.info("signed %s (%d files) with key %s", root, len(resources), kid[:16])
    return Signed(root, out, kid, len(resources))

