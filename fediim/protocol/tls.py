"""TLS material for a federation: a private CA and a SuperLink server certificate.

A deployment needs one certificate authority whose certificate every SuperNode (and the
``flwr`` CLI) trusts (``--root-certificates ca.crt`` / ``root-certificates`` in the
connection), and one server certificate for the SuperLink signed by that CA, whose subject
alternative names cover every name the nodes dial (``localhost`` and ``127.0.0.1`` for a
local deployment; the public DNS name for a real one). Everything is generated with the
``cryptography`` package; private keys are written with mode 0600, certificates and
public keys with mode 0644 (whatever the umask).

For hospitals, the CA key belongs to whoever operates the SuperLink (or the consortium's
PKI); only ``ca.crt`` is handed to the sites.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fediim.io.atomic import atomic_write_public, atomic_write_secret

__all__ = [
    "TLSFiles",
    "generate_ca",
    "generate_server_certificate",
    "write_node_auth_keypair",
    "write_private_key",
    "write_tls_files",
]

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class TLSFiles:
    """Paths of the files written by :func:`write_tls_files`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fediim federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def generate_ca(
    common_name: str = "fediim federation CA",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (EC P-256) allowed to sign server certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def generate_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_names: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate signed by the CA with the given subject alternative names."""
    if not dns_names and not ip_addresses:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else ip_addresses[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_private_key(path: str | os.PathLike[str], key: ec.EllipticCurvePrivateKey) -> None:
    """Write an unencrypted PKCS#8 PEM private key, readable by its owner only (0600)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write_secret(path, pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    """A certificate, PEM, mode 0644 whatever the umask (public, but not for others to
    replace)."""
    atomic_write_public(path, cert.public_bytes(serialization.Encoding.PEM))


def write_tls_files(
    directory: str | os.PathLike[str],
    dns_names: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
) -> TLSFiles:
    """Generate a CA and a server certificate into ``directory`` (created if needed).

    Writes ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``. Defaults cover a
    SuperLink on this machine (``localhost``, ``127.0.0.1``).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = generate_ca()
    srv_key, srv_cert = generate_server_certificate(ca_key, ca_cert, dns_names, ip_addresses)
    files = TLSFiles(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key")
    _write_cert(files.ca_cert, ca_cert)
    write_private_key(files.ca_key, ca_key)
    _write_cert(files.server_cert, srv_cert)
    write_private_key(files.server_key, srv_key)
    return files


def write_node_auth_keypair(private_path: str | os.PathLike[str],
                            public_path: str | os.PathLike[str]) -> None:
    """A SuperNode authentication key pair (EC P-384, OpenSSH format, as Flower expects).

    The SuperNode is started with ``--auth-supernode-private-key PRIVATE``; the SuperLink
    operator registers ``PUBLIC`` with ``flwr supernode register PUBLIC <connection>``.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    atomic_write_secret(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    atomic_write_public(public_path, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
