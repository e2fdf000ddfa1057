"""Preflight's three network checks (server name, server port, server TLS), each failing with its named cause.

The TLS server here is a plain ``ssl`` listener on 127.0.0.1 with certificates made for the test: a
right one, one issued for another server name, and one from another root CA (another provisioning run)."""

import datetime
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedmed.deploy import reachability
from fedmed.deploy.processes import free_port

pytestmark = pytest.mark.unit


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, ca: bool = False, san: str | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


class PKI:
    """A root CA with a server and a client certificate, as one provisioning run makes them."""

    def __init__(self, folder, server_name="localhost"):
        folder.mkdir(parents=True, exist_ok=True)
        ca_key = _key()
        self.ca = _write(folder / "rootCA.pem", _cert("root", ca_key, "root", ca_key, ca=True))
        server_key, client_key = _key(), _key()
        self.server_cert = _write(folder / "server.crt", _cert(server_name, server_key, "root", ca_key, san=server_name))
        self.server_key = _write(folder / "server.key", key=server_key)
        self.client_cert = _write(folder / "client.crt", _cert("hospital-01", client_key, "root", ca_key))
        self.client_key = _write(folder / "client.key", key=client_key)


def tls_context(cert, key, ca) -> ssl.SSLContext:
    """A server's mutual-TLS context: its certificate and key, clients' certificates checked against ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    context.load_verify_locations(str(ca))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def serve_tls(listener: socket.socket, context: ssl.SSLContext) -> None:
    """Accept connections and complete (or refuse) each TLS handshake until the listener is closed."""
    try:
        while True:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(2)
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass
    except OSError:
        return


@pytest.fixture
def tls_server():
    """Start a mutual-TLS listener on 127.0.0.1 with a given PKI; yields a starter returning the port."""
    sockets = []

    def start(pki: PKI) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        sockets.append(listener)
        threading.Thread(target=serve_tls, args=(listener, tls_context(pki.server_cert, pki.server_key, pki.ca)),
                         daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for s in sockets:
        s.close()


def _run(pki, port, host="localhost"):
    return dict(reachability.check_endpoint(host, port, pki.ca, pki.client_cert, pki.client_key, timeout=3,
                                            where="from the test kit"))


def test_all_three_checks_pass_against_the_server_of_the_same_provisioning_run(tmp_path, tls_server):
    pki = PKI(tmp_path / "run")
    results = _run(pki, tls_server(pki))
    assert results == {reachability.NAME: [], reachability.PORT: [], reachability.TLS: []}


def test_a_server_name_that_does_not_resolve_fails_the_name_check_and_skips_the_rest(tmp_path):
    pki = PKI(tmp_path / "run")
    results = _run(pki, free_port(), host="fl-server.no-such-domain.invalid")
    assert "does not resolve" in results[reachability.NAME][0]
    assert "fl-server.no-such-domain.invalid" in results[reachability.NAME][0]
    assert results[reachability.PORT] == ["not attempted: the server name check failed"]
    assert results[reachability.TLS][0].startswith("not attempted")


def test_a_port_nobody_listens_on_fails_the_port_check_naming_host_and_port(tmp_path):
    pki = PKI(tmp_path / "run")
    port = free_port()
    results = _run(pki, port)
    assert results[reachability.NAME] == []
    assert f"localhost:{port}" in results[reachability.PORT][0] and "refused" in results[reachability.PORT][0]
    assert results[reachability.TLS][0].startswith("not attempted")


def test_a_kit_provisioned_for_another_server_name_fails_tls_naming_the_name(tmp_path, tls_server):
    server_side = PKI(tmp_path / "run", server_name="fl-server.other-name.test")
    port = tls_server(server_side)  # same CA for both sides: only the name differs
    results = _run(server_side, port, host="localhost")
    assert results[reachability.PORT] == []
    problem = results[reachability.TLS][0]
    assert "not for 'localhost'" in problem and "another server name" in problem


def test_a_server_from_another_provisioning_run_fails_tls_as_a_different_run(tmp_path, tls_server):
    server_run, kit_run = PKI(tmp_path / "server"), PKI(tmp_path / "kit")
    results = _run(kit_run, tls_server(server_run))
    assert results[reachability.PORT] == []
    assert "different provisioning run" in results[reachability.TLS][0]


if __name__ == "__main__":  # the same listener as a process, on a test host (tests/deploy/test_rehearse_netns.py)
    import sys

    cert, key, ca, host, port = sys.argv[1:6]
    server = socket.create_server((host, int(port)))
    print("listening", flush=True)
    serve_tls(server, tls_context(cert, key, ca))
