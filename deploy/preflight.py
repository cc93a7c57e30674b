"""Check the TLS and node-authentication files of a FedMUD role before Flower starts.

Flower itself reports a missing or wrong certificate as a raw gRPC/SSL error (or, for a
SuperNode, retries forever). deploy/entrypoint.sh runs this first, so that the operator gets
one line naming the file, what is wrong with it, and what to pass instead:

    python deploy/preflight.py superlink   # $FEDMUD_TLS_DIR/{ca.crt,server.pem,server.key}
    python deploy/preflight.py supernode   # ca.crt, $FEDMUD_NODE_KEY, and a TLS handshake
                                           # with $SUPERLINK_FLEET when it is reachable
    python deploy/preflight.py cli         # ca.crt and a TLS handshake with $SUPERLINK_CONTROL
    python deploy/preflight.py pubkeys KEY.pub ...   # keys to register (OpenSSH public keys)

Exit status 0 when everything checked is fine (a SuperLink that cannot be reached yet is only
a note: Flower retries), 2 with one "[fedmud preflight] ERROR: ..." line otherwise.
Environment: FEDMUD_TLS_DIR (empty: plaintext, nothing to check), FEDMUD_NODE_KEY,
SUPERLINK_FLEET [superlink:9092], SUPERLINK_CONTROL [superlink:9093], FEDMUD_PREFLIGHT_TIMEOUT
[5 s per handshake], FEDMUD_HOST_TLS_DIR (set by the Compose files: the host directory mounted
at FEDMUD_TLS_DIR, so that messages name the file on the host too).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

MAKE_CERTS = "scripts/make-certs.sh"


class Problem(Exception):
    """One problem with one file, phrased for the operator."""


def _where(path: Path) -> str:
    """The path, plus where it comes from on the host when the Compose files mounted it."""
    text = str(path)
    tls_dir, host_dir = os.environ.get("FEDMUD_TLS_DIR", ""), os.environ.get("FEDMUD_HOST_TLS_DIR", "")
    if host_dir and tls_dir and text.startswith(tls_dir.rstrip("/") + "/"):
        host = f"{host_dir.rstrip('/')}/{text[len(tls_dir.rstrip('/')) + 1:]}"
        relative = "" if host.startswith("/") else " relative to deploy/"
        return f"{text} (on the host: {host}{relative}, in FEDMUD_CERTS_DIR)"
    return text


def _read(path: Path, what: str, instead: str) -> bytes:
    where = _where(path)
    if not path.exists():
        raise Problem(f"{what} {where} does not exist. {instead}")
    if path.is_dir():
        raise Problem(f"{what} {where} is a directory, not a file. {instead}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise Problem(f"{what} {where} cannot be read ({err.strerror}). Make it readable by this user, or {instead[0].lower()}{instead[1:]}") from None


def _kind(data: bytes) -> str:
    """What a file that is not what we wanted looks like, for the message."""
    text = data[:4096].decode("ascii", "replace")
    for marker, kind in (
        ("BEGIN OPENSSH PRIVATE KEY", "an OpenSSH private key (a SuperNode key)"),
        ("PRIVATE KEY", "a private key"),
        ("BEGIN CERTIFICATE REQUEST", "a certificate request"),
        ("BEGIN CERTIFICATE", "a certificate"),
    ):
        if marker in text:
            return kind
    if text.startswith(("ecdsa-sha2-", "ssh-")):
        return "an OpenSSH public key"
    if not data.strip():
        return "empty"
    return "not PEM"


def _certs(path: Path, what: str, instead: str) -> list[x509.Certificate]:
    data = _read(path, what, instead)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise Problem(f"{what} {_where(path)} is not a PEM certificate (it is {_kind(data)}). {instead}")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise Problem(f"{what} {_where(path)} is not a valid PEM certificate ({err}). {instead}") from None


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(no subject)"


def _key_ids(cert: x509.Certificate) -> tuple[str, str]:
    """(this certificate's key id, its issuer's key id), shortened; '?' where absent."""
    def short(value: bytes | None) -> str:
        return ":".join(f"{b:02X}" for b in value[:6]) if value else "?"

    try:
        own = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER).value.digest
    except x509.ExtensionNotFound:
        own = None
    try:
        issuer = cert.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value.key_identifier
    except x509.ExtensionNotFound:
        issuer = None
    return short(own), short(issuer)


def _ca_text(ca: x509.Certificate) -> str:
    return f"{_name(ca)} with key id {_key_ids(ca)[0]}"


def _issuer_text(cert: x509.Certificate) -> str:
    return f"{cert.issuer.rfc4514_string()} with key id {_key_ids(cert)[1]}"


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    return [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)] + [
        f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)
    ]


def _valid_now(cert: x509.Certificate, what: str, path: Path, instead: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if now < cert.not_valid_before_utc:
        raise Problem(f"{what} {_where(path)} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock). {instead}")
    if now > cert.not_valid_after_utc:
        raise Problem(f"{what} {_where(path)} expired on {cert.not_valid_after_utc:%Y-%m-%d} UTC. {instead}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca
    except x509.ExtensionNotFound:
        return cert.issuer == cert.subject  # an old-style self-signed root


def _issued_by(cert: x509.Certificate, cas: list[x509.Certificate]) -> bool:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, Exception):  # InvalidSignature, issuer mismatch, key type
            continue
    return False


def tls_dir() -> Path | None:
    value = os.environ.get("FEDMUD_TLS_DIR", "").strip()
    return Path(value) if value else None


def check_ca(tls: Path) -> list[x509.Certificate]:
    ca_path = tls / "ca.crt"
    instead = (
        f"Pass the federation's CA certificate as ca.crt in that directory: the ca.crt that {MAKE_CERTS} "
        "made (copy it from the machine that made the credentials)"
    )
    cas = _certs(ca_path, "the CA certificate", instead + ".")
    if not any(_is_ca(c) for c in cas):
        cert = cas[0]
        raise Problem(
            f"the CA certificate {_where(ca_path)} is not a CA certificate: it is the certificate of {_name(cert)}, "
            f"issued by {cert.issuer.rfc4514_string()}. {instead}, not server.pem."
        )
    for cert in cas:
        _valid_now(cert, "the CA certificate", ca_path, f"Make a new CA and certificates with {MAKE_CERTS}.")
    return cas


def check_superlink(tls: Path) -> list[str]:
    cas = check_ca(tls)
    pem, key_path = tls / "server.pem", tls / "server.key"
    remake = f"Pass the SuperLink certificate that {MAKE_CERTS} made with this ca.crt (delete server.pem and server.key and run it again to remake them)."
    certs = _certs(pem, "the SuperLink certificate", remake)
    server = certs[0]
    _valid_now(server, "the SuperLink certificate", pem, remake)
    if not _issued_by(server, cas):
        raise Problem(
            f"the SuperLink certificate {_where(pem)} was not signed by the CA certificate {_where(tls / 'ca.crt')} "
            f"(server.pem was issued by {_issuer_text(server)}; this ca.crt is {_ca_text(cas[0])}), so no SuperNode "
            f"or CLI that trusts this ca.crt would accept it. Pass the ca.crt and server.pem that {MAKE_CERTS} made "
            "together, in the same directory."
        )
    data = _read(key_path, "the SuperLink private key", remake)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise Problem(f"the SuperLink private key {_where(key_path)} is not an unencrypted PEM private key (it is {_kind(data)}; {err}). {remake}") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != server.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise Problem(f"the SuperLink private key {_where(key_path)} does not belong to the certificate {_where(pem)}. {remake}")
    return [f"SuperLink certificate {pem}: {_name(server)}, valid for {', '.join(_names(server)) or '(no names)'}, signed by {_name(cas[0])}"]


def check_node_key(path: Path) -> str:
    instead = (
        "Pass this SuperNode's private key (NODE_KEY for deploy/compose.client.yml, FEDMUD_NODE_KEY otherwise; "
        f"OpenSSH format, ECDSA), e.g. keys/node-0 from {MAKE_CERTS} -n N: the file without .pub, whose .pub "
        "was registered with `register`."
    )
    data = _read(path, "the SuperNode private key", instead)
    if data.lstrip().startswith((b"ecdsa-sha2-", b"ssh-")):
        raise Problem(f"the SuperNode private key {_where(path)} is a public key. {instead}")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, Exception) as err:  # noqa: BLE001 - any parse failure is the same problem
        raise Problem(f"the SuperNode private key {_where(path)} is not an unencrypted OpenSSH private key (it is {_kind(data)}: {err}). {instead}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise Problem(f"the SuperNode private key {_where(path)} is a {type(key).__name__}, Flower needs an ECDSA key. {instead}")
    return f"SuperNode key {path}: ECDSA {key.curve.name}"


def check_public_keys(paths: list[str]) -> list[str]:
    notes = []
    for name in paths:
        path = Path(name)
        instead = f"Pass the public key of a SuperNode (keys/NAME.pub from {MAKE_CERTS} -n N), not its private key."
        data = _read(path, "the SuperNode public key", instead)
        if b"PRIVATE KEY" in data:
            raise Problem(f"the SuperNode public key {_where(path)} is a private key. {instead} Keep the private key on its SuperNode only.")
        try:
            key = serialization.load_ssh_public_key(data.strip())
        except (ValueError, TypeError, Exception) as err:  # noqa: BLE001
            raise Problem(f"the SuperNode public key {_where(path)} is not an OpenSSH public key (it is {_kind(data)}: {err}). {instead}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise Problem(f"the SuperNode public key {_where(path)} is a {type(key).__name__}; Flower needs ECDSA. {instead}")
        notes.append(f"public key {path}: ECDSA {key.curve.name}")
    return notes


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def probe(address: str, tls: Path, cas: list[x509.Certificate], role: str) -> str:
    """A TLS handshake with the SuperLink that verifies its certificate against ca.crt."""
    host, port = _split(address)
    timeout = float(os.environ.get("FEDMUD_PREFLIGHT_TIMEOUT", "5"))
    ca_path = tls / "ca.crt"
    context = ssl.create_default_context(cafile=str(ca_path))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return f"TLS handshake with {address}: certificate verified by {ca_path}"
    except ssl.SSLCertVerificationError as err:
        peer = _peer_certificate(host, port, timeout)
        seen = ""
        if peer is not None:
            seen = f" It presented {_name(peer)}, issued by {_issuer_text(peer)}, valid for {', '.join(_names(peer)) or '(no names)'}."
        if "hostname" in (err.verify_message or "").lower() or "IP address mismatch" in (err.verify_message or ""):
            raise Problem(
                f"the SuperLink at {address} has a certificate that is not valid for the name {host!r} that this {role} dials "
                f"({err.verify_message}).{seen} Dial one of the names it is valid for (set "
                f"{'SUPERLINK_FLEET / SUPERLINK' if role == 'SuperNode' else 'SUPERLINK_CONTROL'}), or remake the SuperLink "
                f"certificate with that name: {MAKE_CERTS} ... {host}."
            ) from None
        raise Problem(
            f"the CA certificate {_where(ca_path)} does not verify the certificate of the SuperLink at {address} "
            f"({err.verify_message}); this ca.crt is {_ca_text(cas[0])}.{seen} Pass the ca.crt that signed the SuperLink's "
            f"certificate (the one {MAKE_CERTS} made together with the SuperLink's server.pem)."
        ) from None
    except ssl.SSLError as err:
        raise Problem(
            f"the SuperLink at {address} does not complete a TLS handshake ({err.reason or err}): it may run without TLS "
            "(no FEDMUD_TLS_DIR there); then run this side without FEDMUD_TLS_DIR as well, or give the SuperLink its certificates."
        ) from None
    except (OSError, ValueError) as err:
        return f"note: cannot reach the SuperLink at {address} yet ({err}); starting anyway ({role}s retry), its certificate is not checked"


def _peer_certificate(host: str, port: int, timeout: float) -> x509.Certificate | None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("superlink", "supernode", "cli", "pubkeys"):
        print(__doc__, file=sys.stderr)
        return 2
    role, args = argv[0], argv[1:]
    tls = tls_dir()
    notes: list[str] = []
    try:
        if role == "pubkeys":
            notes += check_public_keys(args)
        elif role == "superlink":
            if tls is not None:
                notes += check_superlink(tls)
        else:
            node_key = os.environ.get("FEDMUD_NODE_KEY", "").strip()
            if role == "supernode" and node_key:
                notes.append(check_node_key(Path(node_key)))
            if tls is not None:
                cas = check_ca(tls)
                if role == "supernode":
                    address = os.environ.get("SUPERLINK_FLEET", "") or "superlink:9092"
                    notes.append(probe(address, tls, cas, "SuperNode"))
                else:
                    address = os.environ.get("SUPERLINK_CONTROL", "") or "superlink:9093"
                    notes.append(probe(address, tls, cas, "CLI"))
    except Problem as problem:
        print(f"[fedmud preflight] ERROR: {problem}", file=sys.stderr, flush=True)
        return 2
    for note in notes:
        print(f"[fedmud preflight] {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
