"""A version folder's manifest: the sha256 of every file in it, optionally signed.

    <version>/manifest.json   {"format", "version", "files": {relative path: sha256}, "signature"}

The signature ("hmac-sha256:<hex>" or "ed25519:<base64>", null when unsigned) is over the document
without it, in canonical form; one file, so that rewriting the manifest (registration) is one write.

Whatever the product or MLflow loads or executes from a folder (weights, reference, model.json,
profile, report, and once registered mlflow_pyfunc.py, MLmodel and the environment files) is in the
manifest, and loading refuses a folder with a changed, added or missing file, naming it. The hashes
alone stop accidents and a writer who does not know the format; against a writer who does, sign:

    VAE_MANIFEST_HMAC_KEY      a shared secret: writers sign with it, readers require the signature
    VAE_MANIFEST_SIGNING_KEY   an ed25519 private key (PEM text, or a file holding it): writers sign
    VAE_MANIFEST_VERIFY_KEY    the matching public key: readers require the signature, and cannot forge one

With a key set, an unsigned or wrongly signed manifest is refused; with none, signatures are not checked.
Rotation: readers accept several keys at once (HMAC keys comma-separated, the first one signs; several
PEM public keys in one value), the publisher re-signs the kept versions with the new key
(`python -m vae.versions.artifacts resign <model_root>`), then the old key is dropped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from vae.errors import InputError

log = logging.getLogger("vae.versions.manifest")

MANIFEST_FILE = "manifest.json"
FORMAT = "vae-manifest/1"
# Written by MLflow into the copy it downloads for a models:/ URI (the registered name and number, read
# with yaml.safe_load): not in the folder that was saved, never executed.
DOWNLOAD_ONLY = frozenset({"registered_model_meta"})
HMAC_ENV = "VAE_MANIFEST_HMAC_KEY"
SIGNING_ENV = "VAE_MANIFEST_SIGNING_KEY"
VERIFY_ENV = "VAE_MANIFEST_VERIFY_KEY"


class ManifestError(InputError):
    """A version folder that does not match its manifest, or a manifest whose signature fails."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _signed_part(version: str, files: Mapping[str, str]) -> bytes:
    return json.dumps({"format": FORMAT, "version": version, "files": dict(files)}, sort_keys=True).encode()


def manifest_bytes(version: str, files: Mapping[str, str]) -> bytes:
    """manifest.json for `files` (relative path -> sha256), signed with the environment's key if any."""
    document = {
        "format": FORMAT,
        "version": version,
        "files": dict(sorted(files.items())),
        "signature": sign(_signed_part(version, files)),
    }
    return json.dumps(document, indent=2, sort_keys=True).encode()


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under a local folder but the manifest."""
    return {
        path.relative_to(folder).as_posix(): sha256(path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST_FILE
    }


def write_manifest(folder: Path, version: str) -> None:
    """Write manifest.json for a local folder (staged: not yet a version)."""
    (folder / MANIFEST_FILE).write_bytes(manifest_bytes(version, folder_hashes(folder)))


def parse(where: str, data: bytes) -> dict[str, str]:
    """The files a manifest lists, after checking its signature against the environment's key."""
    try:
        document = json.loads(data)
        version, files, signature = document["version"], document["files"], document.get("signature")
        if document.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ManifestError(
            f"model version {where}: {MANIFEST_FILE} is unreadable; the version is corrupt"
        ) from None
    verify_signature(where, _signed_part(version, files), signature)
    return files


def sign(data: bytes) -> str | None:
    """The signature of a manifest with the environment's key; None when no signing key is set; an
    error when a reader's key is set but no writer's (a manifest written then could never load)."""
    if secrets := _hmac_keys():
        return "hmac-sha256:" + hmac.new(secrets[0], data, hashlib.sha256).hexdigest()
    if pem := os.environ.get(SIGNING_ENV):
        signature = _private_key(pem).sign(data)
        return "ed25519:" + base64.b64encode(signature).decode()
    if os.environ.get(VERIFY_ENV):
        raise ManifestError(
            f"{VERIFY_ENV} is set, so manifests must be signed, but {SIGNING_ENV} (the private key) is not: "
            "only the publishing identity can write a model version"
        )
    return None


def verify_signature(where: str, data: bytes, signature: str | None) -> None:
    """Refuse a manifest whose signature the environment's key does not accept; accept any when no
    key is set."""
    if secrets := _hmac_keys():
        expected = ["hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest() for key in secrets]
        if signature is None or not any(hmac.compare_digest(signature.strip(), e) for e in expected):
            raise ManifestError(_unsigned(where, signature, "HMAC"))
        return
    public_keys = _public_keys()
    if not public_keys:
        return
    from cryptography.exceptions import InvalidSignature

    kind, _, encoded = (signature or "").strip().partition(":")
    for public_key in public_keys:
        try:
            if kind == "ed25519":
                public_key.verify(base64.b64decode(encoded, validate=True), data)
                return
        except (InvalidSignature, ValueError):
            continue
    raise ManifestError(_unsigned(where, signature, "ed25519"))


def _unsigned(where: str, signature: str | None, kind: str) -> str:
    problem = "is not signed" if signature is None else f"has a signature the {kind} key does not accept"
    return (
        f"model version {where}: {MANIFEST_FILE} {problem}; it was not written by the publishing identity "
        "(or with another key). Refusing to load it"
    )


def signing_required() -> bool:
    return bool(os.environ.get(HMAC_ENV) or os.environ.get(VERIFY_ENV) or os.environ.get(SIGNING_ENV))


def check_files(where: str, listed: Mapping[str, str], found: Mapping[str, str]) -> None:
    """Refuse a folder whose files (relative path -> sha256) differ from the manifest's, naming them."""
    changed = sorted(name for name in listed.keys() & found.keys() if listed[name] != found[name])
    added = sorted(found.keys() - listed.keys() - DOWNLOAD_ONLY)
    missing = sorted(listed.keys() - found.keys())
    problems = [f"{name} changed" for name in changed] + [f"{name} added" for name in added]
    problems += [f"{name} missing" for name in missing]
    if problems:
        raise ManifestError(
            f"model version {where} does not match its manifest: {', '.join(problems[:5])}"
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
            + "; someone or something changed the folder after it was saved. Restore it or train a new "
            "version"
        )


def _key_text(value: str) -> bytes:
    path = Path(value)
    if "BEGIN" not in value and len(value) < 4096 and path.is_file():
        return path.read_bytes()
    return value.encode()


def _private_key(value: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(_key_text(value), password=None)
    except ValueError as error:
        raise ManifestError(f"{SIGNING_ENV} is not a PEM private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ManifestError(f"{SIGNING_ENV} is not an ed25519 key")
    return key


def _hmac_keys() -> list[bytes]:
    return [key.strip().encode() for key in os.environ.get(HMAC_ENV, "").split(",") if key.strip()]


def _public_keys() -> list:
    """The verifying keys: every PEM public key in VAE_MANIFEST_VERIFY_KEY, and the signing key's public
    half; none when neither is set."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys = []
    if value := os.environ.get(VERIFY_ENV):
        text = _key_text(value).decode()
        blocks = re.findall(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", text, re.DOTALL)
        for block in blocks or [text]:
            try:
                key = load_pem_public_key(block.encode())
            except ValueError as error:
                raise ManifestError(f"{VERIFY_ENV} is not a PEM public key: {error}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ManifestError(f"{VERIFY_ENV} holds a key that is not ed25519")
            keys.append(key)
    if value := os.environ.get(SIGNING_ENV):
        keys.append(_private_key(value).public_key())
    return keys
