"""TLS for the SuperLink (a CA kept across restarts, a certificate for the names machines use) and SuperNode key
pairs for SuperNode authentication."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.store import atomic_write_bytes


def _write_private(path: Path, data: bytes) -> None:
    """A key file only its owner may read (made so before the key is in it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(name: str) -> x509.GeneralName:
    """A certificate name: an IP address, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_tls(directory: Path, names: list[str], days: int = 2) -> tuple[Path, Path, Path]:
    """A SuperLink certificate whose names are `names` (hostnames or IPs), signed by the CA in `directory`
    (ca.pem, ca.key: made on first use, then kept, so machines that hold ca.pem stay valid across restarts);
    (ca.pem, superlink.pem, superlink.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if ca_path.exists() and ca_key_path.exists():
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = cast(ec.EllipticCurvePrivateKey, serialization.load_pem_private_key(ca_key_path.read_bytes(), None))
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OPPU-FL CA")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(ca_key_path, ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        atomic_write_bytes(ca_path, ca.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in dict.fromkeys(names)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "superlink.pem", directory / "superlink.key"
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return ca_path, cert_path, key_path


def make_node_keys(directory: Path) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format, as SuperNode authentication expects: (private, public); an existing pair in
    `directory` is kept (its public key may already be registered)."""
    private, public = directory / "node_key", directory / "node_key.pub"
    if private.exists() and public.exists():
        return private, public
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    atomic_write_bytes(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH))
    return private, public
