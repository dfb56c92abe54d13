"""P-256 key files, ECDSA-SHA256 signatures, and signed update claims.

The keys are the kind Flower SuperNode authentication uses: an EC key on NIST P-256, the
private half as an unencrypted PKCS8 PEM file, the public half as an OpenSSH line
(``ecdsa-sha2-nistp256 AAAA...``). Signatures are DER-encoded ECDSA-SHA256, base64 text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey


def generate_key_pair(private_path: Path, public_path: Path) -> PrivateKey:
    """Create a P-256 key pair and write it to two new files.

    Parameters
    ----------
    private_path : Path
        Where the private key goes: PKCS8 PEM, unencrypted, file mode ``0o600``.
    public_path : Path
        Where the public key goes: one OpenSSH line ending in a newline.

    Returns
    -------
    PrivateKey
        The new private key (its public half is ``.public_key()``).

    Raises
    ------
    FileExistsError
        If either file already exists; nothing is written then, so an existing key is never
        replaced by accident.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path == public_path:
        raise ValueError(f"private and public key paths are the same file: {private_path}")
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"refusing to overwrite existing key file {path}")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, openssh_bytes(key.public_key()) + b"\n", 0o644)
    return key


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL closes the race between the exists() check above and this open.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise FileExistsError(f"refusing to overwrite existing key file {path}") from exc
    try:
        # The umask can only clear bits; fchmod makes the mode exact either way.
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_private_key(path: Path) -> PrivateKey:
    """Read an unencrypted P-256 private key from a PEM file.

    Raises
    ------
    OSError
        If the file cannot be read (the message names it).
    ValueError
        If the file is not an unencrypted PEM private key on P-256.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise ValueError(f"private key file {path} is encrypted; unencrypted is needed") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"private key file {path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"private key file {path} holds a {_describe(key)}, not a P-256 EC key")
    return key


def load_public_key(path: Path) -> PublicKey:
    """Read a P-256 public key from an OpenSSH line or a PEM file.

    Raises
    ------
    OSError
        If the file cannot be read (the message names it).
    ValueError
        If the file is neither format, or the key is not on P-256.
    """
    path = Path(path)
    data = path.read_bytes().strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"public key file {path} is neither OpenSSH nor PEM: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"public key file {path} holds a {_describe(key)}, not a P-256 EC key")
    return key


def _describe(key: object) -> str:
    curve = getattr(key, "curve", None)
    return f"{type(key).__name__} ({curve.name})" if curve is not None else type(key).__name__


def openssh_bytes(public_key: PublicKey) -> bytes:
    """Return the OpenSSH encoding ``ecdsa-sha2-nistp256 AAAA...`` (no newline)."""
    encoding = serialization.Encoding.OpenSSH
    return public_key.public_bytes(encoding, serialization.PublicFormat.OpenSSH)


def public_key_fingerprint(public_key: PublicKey) -> str:
    """Return the SHA-256 hex digest of the key's OpenSSH encoding (no trailing newline)."""
    return hashlib.sha256(openssh_bytes(public_key)).hexdigest()


def sign(private_key: PrivateKey, data: bytes) -> str:
    """Sign ``data`` with ECDSA-SHA256 and return the DER signature as base64 text."""
    signature = private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


def verify(public_key: PublicKey, data: bytes, sig_b64: str) -> bool:
    """Return whether ``sig_b64`` is a valid signature of ``data`` by ``public_key``.

    Malformed input (not base64, not a DER signature, not a string) counts as invalid rather
    than raising, because signatures arrive from files and the network.
    """
    if not isinstance(sig_b64, str):
        return False
    try:
        signature = base64.b64decode(sig_b64.encode("ascii"), validate=True)
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return True


def _update_payload(run_id: str, round: int, digest: str) -> bytes:
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise ValueError(f"round must be a non-negative int, got {round!r}")
    if not isinstance(digest, str) or not digest:
        raise ValueError(f"digest must be a non-empty string, got {digest!r}")
    # The "kind" tag keeps an audit-entry signature (which has no such field) from being
    # replayed as an update signature, and the reverse.
    claim = {"kind": "idc-update", "run_id": run_id, "round": round, "digest": digest}
    return json.dumps(claim, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_update(private_key: PrivateKey, run_id: str, round: int, digest: str) -> str:
    """Sign the claim "I sent the update with ``digest`` for ``run_id``, round ``round``".

    Returns
    -------
    str
        The base64 ECDSA-SHA256 signature over the canonical JSON
        ``{"digest", "kind": "idc-update", "round", "run_id"}``.

    Raises
    ------
    ValueError
        If ``run_id`` or ``digest`` is not a non-empty string or ``round`` not an int >= 0.
    """
    return sign(private_key, _update_payload(run_id, round, digest))


def verify_update(public_key: PublicKey, run_id: str, round: int, digest: str, sig: str) -> bool:
    """Return whether ``sig`` is the key holder's :func:`sign_update` of exactly these fields."""
    try:
        payload = _update_payload(run_id, round, digest)
    except ValueError:
        return False
    return verify(public_key, payload, sig)
