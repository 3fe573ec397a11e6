"""Artifact signatures in the OpenSSF model-signing format, checked on the device before loading.

The manifest's hashes catch corruption, not tampering: whoever can write the folder can rewrite
``manifest.json``. A signature by a key the device trusts closes that gap.

Format (``model_signing`` 1.x, "private key" method, so no Sigstore and no network): ``model.sig``
in the artifact folder is a Sigstore bundle (``application/vnd.dev.sigstore.bundle.v0.3+json``)
holding a DSSE envelope whose payload is an in-toto statement of predicate type
``https://model_signing/signature/v1.0``: the sha256 of every file of the folder (``manifest.json``
included, ``model.sig`` ignored), signed with ECDSA (P-256/384/521) over the DSSE PAE. The public
key is named in the bundle by the sha256 of its PEM (``verificationMaterial.publicKey.hint``).
``model_signing``'s own verifier accepts what :mod:`edgepipe.package.signing` writes, and this
module accepts what ``model_signing`` writes (the tests check both ways).

This verifier needs only ``cryptography`` (imported when a device has trusted keys), where the
``model-signing`` package would bring sigstore, tuf, pydantic and a dozen more onto the device.

Trusted keys (public PEM files): ``--trusted-keys`` / ``$EDGEPIPE_TRUSTED_KEYS`` (files or folders,
separated by ``:``; set but empty means none), else ``$XDG_CONFIG_HOME/edgepipe/trusted-keys``
(default ``~/.config/...``) and ``/etc/edgepipe/trusted-keys``. A device with trusted keys refuses
an unsigned artifact, one signed by another key, or one changed after signing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgepipe.errors import InputError, SignatureError, cannot_read

SIGNATURE_NAME = "model.sig"
ENV_TRUSTED_KEYS = "EDGEPIPE_TRUSTED_KEYS"
SYSTEM_KEYS_DIR = Path("/etc/edgepipe/trusted-keys")
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
#: What model_signing leaves out of a folder's signature by default (plus the signature itself).
IGNORED = (SIGNATURE_NAME, ".git", ".github", ".gitattributes", ".gitignore")
_KEY_SUFFIXES = (".pub", ".pem")
_MAX_SIGNATURE_BYTES = 16 << 20
_CURVES = {"secp256r1": "SHA256", "secp384r1": "SHA384", "secp521r1": "SHA512"}


@dataclass(frozen=True)
class TrustedKeys:
    """The public key files a device trusts, and where that list came from (for messages)."""

    files: tuple[Path, ...]
    source: str


@dataclass(frozen=True)
class SignatureCheck:
    """What the device knows of an artifact's signature. ``status``: ``verified`` (by ``key_id``,
    the sha256 of the key's PEM), ``unsigned`` (no ``model.sig``, no trusted keys) or ``unchecked``
    (a ``model.sig`` but no trusted keys to check it with)."""

    status: str
    key_id: str | None = None

    def describe(self) -> str:
        if self.status == "verified":
            return f"signed by trusted key {str(self.key_id)[:16]}"
        if self.status == "unchecked":
            return "signed, but not checked: this device trusts no signing keys"
        return "unsigned (this device trusts no signing keys)"


# ------------------------------------------------------------------ the format (shared with the signer)
def pae(payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding of an in-toto payload: what the key signs."""
    return b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)


def statement(name: str, resources: Mapping[str, str]) -> dict[str, Any]:
    """The in-toto statement over ``{relative path: sha256}`` (sorted, as model_signing orders them);
    the subject digest is the sha256 over the resources' digests in that order."""
    names = sorted(resources)
    root = hashlib.sha256(b"".join(bytes.fromhex(resources[n]) for n in names)).hexdigest()
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": root}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False, "ignore_paths": list(IGNORED)},
            "resources": [{"name": n, "algorithm": "sha256", "digest": resources[n]} for n in names],
        },
    }


def bundle(payload: bytes, signature: bytes, key_id: str) -> dict[str, Any]:
    """The Sigstore bundle JSON that carries a signed payload (no transparency-log entries)."""
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_id}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}],
        },
    }


def key_id(public_key: Any) -> str:
    """sha256 of the key's SubjectPublicKeyInfo PEM: model_signing's key hint."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def ecdsa_for(public_key: Any) -> Any:
    """The ECDSA scheme of a supported curve (the hash follows the key size, as model_signing does)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    curve = getattr(getattr(public_key, "curve", None), "name", None)
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or curve not in _CURVES:
        raise InputError(f"signing keys must be elliptic-curve P-256, P-384 or P-521 keys (got {curve or type(public_key).__name__})")
    return ec.ECDSA(getattr(hashes, _CURVES[curve])())


# ------------------------------------------------------------------ trusted keys
def trusted_keys(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> TrustedKeys:
    """The device's trusted public keys: ``explicit`` (a flag), else ``$EDGEPIPE_TRUSTED_KEYS``, else
    the first default folder that exists. A named path that does not exist is an error: a typo must
    not turn signature checking off."""
    env = os.environ if environ is None else environ
    if explicit is not None or ENV_TRUSTED_KEYS in env:
        value = explicit if explicit is not None else env[ENV_TRUSTED_KEYS]
        source = "--trusted-keys" if explicit is not None else f"${ENV_TRUSTED_KEYS}"
        return TrustedKeys(tuple(f for part in value.split(os.pathsep) if part for f in _key_files(Path(part).expanduser(), source)), source)
    config = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "edgepipe" / "trusted-keys"
    for folder in (config, SYSTEM_KEYS_DIR):
        if folder.is_dir():
            return TrustedKeys(_key_files(folder, str(folder)), str(folder))
    return TrustedKeys((), "no trusted-keys folder")


def _key_files(path: Path, source: str) -> tuple[Path, ...]:
    if path.is_dir():
        return tuple(sorted(p for p in path.iterdir() if p.suffix in _KEY_SUFFIXES and p.is_file()))
    if path.is_file():
        return (path,)
    if path.exists():
        raise InputError(f"trusted key path {path} (from {source}) is not a regular file (a pipe or a device); pass PEM files or folders")
    raise InputError(f"trusted key path {path} (from {source}) does not exist; fix it or unset it")


def _load_public_keys(keys: TrustedKeys) -> dict[str, Any]:
    """``{key id: public key}``; a key that cannot be read is an error naming the file."""
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise InputError(
            f"this device trusts signing keys ({keys.source}) but the cryptography package is missing; "
            "install it (pip install 'cryptography==50.0.2') to check signatures"
        ) from None
    out = {}
    for f in keys.files:
        try:
            key = serialization.load_pem_public_key(f.read_bytes())
        except OSError as e:
            raise InputError(cannot_read("trusted key", f, e)) from None
        except ValueError as e:
            raise InputError(f"trusted key {f} is not a PEM public key ({type(e).__name__}); replace it") from None
        ecdsa_for(key)
        out[key_id(key)] = key
    return out


# ------------------------------------------------------------------ verification
def check_signature(root: Path, signed_files: Mapping[str, str], keys: TrustedKeys) -> SignatureCheck:
    """Check ``root/model.sig`` against ``signed_files`` (``{rel: sha256}`` that must be signed: the
    manifest's entries and ``manifest.json`` itself) with ``keys``. Without keys, only report.

    Raises :class:`SignatureError` naming the reason: no signature, another key, a damaged or forged
    bundle, files added or missing, or signed hashes that differ (the manifest rewritten, or the
    signature made for an older manifest). The files' contents are hashed by the caller."""
    sig_path = root / SIGNATURE_NAME
    if not keys.files:
        return SignatureCheck("unchecked" if sig_path.is_file() else "unsigned")
    public = _load_public_keys(keys)
    if sig_path.is_symlink() or not sig_path.is_file():
        raise SignatureError(
            f"{root} is not signed (no {SIGNATURE_NAME}) and this device trusts signing keys ({keys.source}); "
            "sign it with `edgepipe sign ARTIFACT --key KEY`"
        )
    doc = _read_bundle(sig_path)
    kid, payload = _verify_envelope(doc, public, keys)
    resources = _signed_resources(payload)
    _compare(root, resources, signed_files)
    return SignatureCheck("verified", kid)


def _read_bundle(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_SIGNATURE_BYTES:
            raise SignatureError(f"{path} is over {_MAX_SIGNATURE_BYTES >> 20} MB; not a signature, re-sign the artifact")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SignatureError(f"{path} is not valid JSON ({type(e).__name__}); the signature is damaged, re-sign the artifact") from None
    if not isinstance(doc, dict) or doc.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise SignatureError(f"{path} is not a model-signing bundle (mediaType {BUNDLE_MEDIA_TYPE}); re-sign the artifact")
    return doc


def _envelope_parts(doc: dict[str, Any]) -> tuple[bytes, bytes, str | None]:
    """The payload, the signature and the key hint of a bundle; a malformed one is refused."""
    try:
        env = doc["dsseEnvelope"]
        if env["payloadType"] != PAYLOAD_TYPE:
            raise SignatureError(f"{SIGNATURE_NAME} signs a {env['payloadType']!r} payload, not an in-toto statement; re-sign the artifact")
        payload = base64.b64decode(env["payload"], validate=True)
        sig = base64.b64decode(env["signatures"][0]["sig"], validate=True)
        hint = ((doc.get("verificationMaterial") or {}).get("publicKey") or {}).get("hint")
    except (KeyError, IndexError, TypeError, AttributeError, binascii.Error):
        raise SignatureError(f"{SIGNATURE_NAME} has no readable DSSE envelope; the signature is damaged, re-sign the artifact") from None
    return payload, sig, hint if isinstance(hint, str) and hint else None


def _verify_envelope(doc: dict[str, Any], public: dict[str, Any], keys: TrustedKeys) -> tuple[str, dict[str, Any]]:
    """The key id that signed the envelope and its decoded statement."""
    from cryptography.exceptions import InvalidSignature

    payload, sig, hint = _envelope_parts(doc)
    if hint is not None and hint not in public:
        raise SignatureError(
            f"{SIGNATURE_NAME} was made by key {hint[:16]}, which this device does not trust "
            f"({len(public)} trusted key(s) from {keys.source}); re-sign with a trusted key or add its public key"
        )
    for kid, key in public.items():
        if hint is not None and kid != hint:
            continue
        try:
            key.verify(sig, pae(payload), ecdsa_for(key))
        except InvalidSignature:
            continue
        try:
            statement_doc = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise SignatureError(f"{SIGNATURE_NAME} signs a payload that is not JSON; re-sign the artifact") from None
        return kid, statement_doc if isinstance(statement_doc, dict) else {}
    if hint is not None:
        raise SignatureError(f"{SIGNATURE_NAME} does not verify with trusted key {hint[:16]}: the signature or its payload was altered")
    raise SignatureError(f"{SIGNATURE_NAME} verifies with none of the {len(public)} trusted key(s) from {keys.source}; re-sign with a trusted key")


def _signed_resources(doc: dict[str, Any]) -> dict[str, str]:
    """``{name: sha256}`` of a verified statement, after checking its type and its subject digest."""
    pred = doc.get("predicate")
    if doc.get("_type") != STATEMENT_TYPE or doc.get("predicateType") != PREDICATE_TYPE or not isinstance(pred, dict):
        raise SignatureError(f"{SIGNATURE_NAME} signs no model-signing v1.0 statement; re-sign the artifact with edgepipe 0.1 or model_signing 1.x")
    ser = pred.get("serialization")
    if not isinstance(ser, dict) or ser.get("method") != "files" or ser.get("hash_type") != "sha256":
        raise SignatureError(f"{SIGNATURE_NAME} uses a serialization this device does not check ({ser!r}); sign per file with sha256")
    out: dict[str, str] = {}
    for r in pred.get("resources") or []:
        if not isinstance(r, dict) or r.get("algorithm") != "sha256" or not isinstance(r.get("name"), str) or not isinstance(r.get("digest"), str):
            raise SignatureError(f"{SIGNATURE_NAME} lists a resource that is not a sha256 file digest; re-sign the artifact")
        out[r["name"]] = r["digest"]
    digests = b"".join(bytes.fromhex(out[n]) for n in sorted(out)) if all(_is_hex(d) for d in out.values()) else None
    subjects = doc.get("subject")
    want = subjects[0].get("digest", {}).get("sha256") if isinstance(subjects, list) and subjects and isinstance(subjects[0], dict) else None
    if digests is None or hashlib.sha256(digests).hexdigest() != want:
        raise SignatureError(f"{SIGNATURE_NAME}: the signed statement is inconsistent (its subject digest does not cover its files); re-sign")
    return out


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
    except ValueError:
        return False
    return True


def _compare(root: Path, signed: Mapping[str, str], expected: Mapping[str, str]) -> None:
    """Every file of the folder must be signed with the hash the manifest gives it (one reason each)."""
    from edgepipe.runtime.manifest import MANIFEST_NAME

    present = _folder_files(root)
    extra = sorted(present - set(signed))
    if extra:
        raise SignatureError(f"{extra[0]} is in {root} but not covered by {SIGNATURE_NAME}; remove it or re-sign the artifact")
    missing = sorted(set(signed) - present)
    if missing:
        raise SignatureError(f"{missing[0]} was signed but is missing from {root}; re-copy the artifact")
    unsigned = sorted(set(expected) - set(signed))
    if unsigned:
        raise SignatureError(f"the manifest lists {unsigned[0]}, which is not signed; re-sign the artifact")
    rewritten = sorted(rel for rel in expected if rel != MANIFEST_NAME and signed[rel] != expected[rel])
    if rewritten:
        raise SignatureError(
            f"manifest.json gives {rewritten[0]} a sha256 other than the signed one: the manifest was rewritten after "
            "signing; refusing the artifact"
        )
    if signed.get(MANIFEST_NAME) != expected.get(MANIFEST_NAME):
        raise SignatureError(
            f"manifest.json is not the one {SIGNATURE_NAME} signed (the signature is over an older or other manifest); "
            "re-sign the artifact after rebuilding it"
        )


def _folder_files(root: Path) -> set[str]:
    """The folder's files as model_signing serializes them (POSIX paths; the ignored names left out)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        dirnames[:] = [d for d in dirnames if (rel_dir / d).as_posix().removeprefix("./") not in IGNORED]
        for name in filenames:
            rel = (rel_dir / name).as_posix().removeprefix("./")
            if rel not in IGNORED:
                out.add(rel)
    return out
