"""TLS on the Endpoint Picker's ext_proc port, like the reference picker's `--secure-serving`.

Two sources of a server certificate:
- files (`--epp-tls-cert`, `--epp-tls-key`, PEM): e.g. a cert-manager Certificate's Secret
  mounted in the pod. Read through `grpc.dynamic_ssl_server_credentials`: a renewed pair (the
  kubelet updates a mounted Secret in place) is taken for new connections without a restart;
  a pair that does not load keeps the previous one (logged).
- self-signed (`--epp-secure-serving`): a key and a certificate made at start, as the reference
  picker does (pkg/common/tls: an ECDSA key, valid a year, for the pod's names); gateways
  configured for GIE's picker skip verification of it (Istio's DestinationRule
  `insecureSkipVerify`, for one). Needs the `cryptography` package, which toposerve does not
  depend on: without it the flag is a start-up error that says so.
The health port stays plaintext (kubelet gRPC probes speak no TLS), as the reference picker's.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from collections.abc import Sequence

import grpc

log = logging.getLogger("toposerve.router.epp")


class TlsError(ValueError):
    """The certificate cannot be loaded or made; the message says which and why."""


def self_signed(hosts: Sequence[str] = ()) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): an ECDSA P-256 key and a self-signed certificate valid for a
    year, for `hosts` (names or IP addresses) plus this host's name, localhost and loopback."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise TlsError(
            "--epp-secure-serving makes a self-signed certificate with the `cryptography` package, "
            "which is not installed: install it, or give --epp-tls-cert and --epp-tls-key"
        ) from None
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, socket.gethostname(), "localhost", "127.0.0.1", "::1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if h:
                names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "toposerve endpoint picker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def read_pair(cert_path: str, key_path: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) from files; TlsError naming the file when one is unreadable."""
    out = []
    for path in (cert_path, key_path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TlsError(f"{path}: cannot read: {e.strerror}") from None
        if b"-----BEGIN" not in data:
            raise TlsError(f"{path}: not PEM")
        out.append(data)
    return out[0], out[1]


class FileCredentials:
    """Server credentials from a certificate and key on disk, re-read when either changes."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self.pair = read_pair(cert_path, key_path)  # a bad pair at start is a start-up error
        self._stamp = self._mtimes()

    def _mtimes(self) -> tuple[float, float]:
        try:
            return os.stat(self.cert_path).st_mtime, os.stat(self.key_path).st_mtime
        except OSError:
            return (0.0, 0.0)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks before each handshake: a new configuration when the files changed, else
        None (keep the current one)."""
        stamp = self._mtimes()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            self.pair = read_pair(self.cert_path, self.key_path)
        except TlsError as e:
            log.error("TLS certificate not reloaded (the previous one stays): %s", e)
            return None
        log.info("TLS certificate reloaded from %s", self.cert_path)
        return grpc.ssl_server_certificate_configuration([(self.pair[1], self.pair[0])])

    def credentials(self) -> grpc.ServerCredentials:
        initial = grpc.ssl_server_certificate_configuration([(self.pair[1], self.pair[0])])
        return grpc.dynamic_ssl_server_credentials(initial, self.fetch)


def server_credentials(
    cert_path: str = "", key_path: str = "", self_signed_hosts: Sequence[str] | None = None
) -> tuple[grpc.ServerCredentials, bytes]:
    """(credentials, certificate PEM) from files, or self-signed when `self_signed_hosts` is not
    None (the PEM: what a client trusts in tests)."""
    if cert_path or key_path:
        if not (cert_path and key_path):
            raise TlsError("--epp-tls-cert and --epp-tls-key go together")
        files = FileCredentials(cert_path, key_path)
        return files.credentials(), files.pair[0]
    if self_signed_hosts is None:
        raise TlsError("no certificate: give --epp-tls-cert/--epp-tls-key or --epp-secure-serving")
    cert, key = self_signed(self_signed_hosts)
    return grpc.ssl_server_credentials([(key, cert)]), cert
