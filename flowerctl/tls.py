"""The federation's certificates: a CA, a server certificate, and SuperNode key formats."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.fileio import write_private


@dataclass(frozen=True)
class TlsPaths:
    """PEM files of a CA and of the server certificate it signed."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_tls(
    out_dir: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost"), days: int = 365
) -> TlsPaths:
    """Write a fresh CA and a server certificate for ``hosts`` (IPs and DNS names as SANs).

    Returns
    -------
    TlsPaths
        ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key`` in ``out_dir`` (keys 0o600).
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hosts = list(hosts)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key, srv_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idc-fl federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = TlsPaths(out / "ca.pem", out / "ca.key", out / "server.pem", out / "server.key")
    paths.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_private(paths.ca_key, _pem_key(ca_key))
    write_private(paths.server_key, _pem_key(srv_key))
    return paths


def to_openssh_private_key(src: Path, dst: Path) -> Path:
    """Copy an EC private key (PEM or OpenSSH) to ``dst`` in the OpenSSH format SuperNodes read."""
    data = Path(src).read_bytes()
    key: object = (
        serialization.load_ssh_private_key(data, None)
        if b"OPENSSH" in data
        else serialization.load_pem_private_key(data, None)
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{src} is not an EC private key")
    fmt = serialization.PrivateFormat.OpenSSH
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    write_private(Path(dst), pem)
    return Path(dst)
