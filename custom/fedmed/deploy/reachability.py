"""Can this host reach the federation's server? Three named checks, in the order a connection needs them.

1. **server name**: the host name in the kit (``startup/fed_client.json`` / ``fed_admin.json``) resolves
   on this machine (DNS or ``/etc/hosts``);
2. **server port**: a TCP connection to that address and port is accepted (a refusal: nothing listens
   there; no answer: a firewall drops the traffic, or the address is not the server's);
3. **server TLS**: the mutual-TLS handshake with the kit's own certificate succeeds, the server's
   certificate chains to the kit's root CA (same provisioning run) AND is issued for the host name the
   kit connects to (a kit provisioned for another server name fails here, by name).

FLARE's own client retries such failures forever without saying why; these checks answer within
seconds. ``preflight`` runs them from a hospital's or an admin's kit; ``rehearse`` runs them on a
hospital's own network host when it does not register (``python -m fedmed.deploy.reachability KIT``).
A later check is not attempted when an earlier one failed (it would only repeat the cause).
"""

from __future__ import annotations

import socket
import ssl
import sys
from pathlib import Path

NAME, PORT, TLS = "server name", "server port", "server TLS"
X509_HOSTNAME_MISMATCH = 62  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH


def check_name(host: str, port: int, where: str) -> list[str]:
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return [f"the server name '{host}' ({where}) does not resolve on this host ({exc.strerror}). Add it to "
                f"this site's DNS, or to /etc/hosts with the server's address; the name must be the one the kits "
                f"were provisioned for"]
    return []


def check_port(host: str, port: int, timeout: float, where: str) -> list[str]:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        return [f"{host}:{port} ({where}) refused the connection: nothing listens there. Is the server started, "
                f"and is {port} the port it was provisioned with?"]
    except (socket.timeout, TimeoutError):
        return [f"no answer from {host}:{port} ({where}) within {timeout:.0f} s: a firewall drops the traffic or "
                f"the name points at another machine. Allow outgoing TCP {port} from this site to the server, "
                f"and incoming TCP {port} at the server"]
    except OSError as exc:
        return [f"{host}:{port} ({where}) is not reachable ({exc.strerror or exc}): check this host's route to "
                f"the server and any firewall between them"]
    return []


def check_tls(host: str, port: int, root_ca: Path, cert: Path, key: Path, timeout: float, where: str) -> list[str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED are on
    context.load_verify_locations(str(root_ca))
    context.load_cert_chain(str(cert), str(key))
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return [f"{host}:{port} ({where}) went away before the TLS handshake ({exc})"]
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(min(1.0, timeout))  # TLS 1.3: the server judges our certificate after the handshake
            try:
                tls.recv(1)
            except socket.timeout:
                pass
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == X509_HOSTNAME_MISMATCH:
            return [f"the server at {host}:{port} presents a certificate that is not for '{host}' "
                    f"({exc.verify_message}). This kit was provisioned for another server name than the one the "
                    f"server's kit holds: ask the project lead for kits from the same provisioning run, made with "
                    f"the server's real host name (python -m fedmed provision --server-name NAME)"]
        return [f"the server's certificate at {host}:{port} is not signed by this kit's root CA "
                f"({exc.verify_message}): this kit comes from a different provisioning run than the server; ask the "
                f"project lead for this site's kit from the current run"]
    except ssl.SSLError as exc:
        if "unknown ca" in str(exc).lower() or "certificate" in str(exc).lower():
            return [f"the server at {host}:{port} refused this kit's certificate ({exc.reason or exc}): the kit comes "
                    f"from a different provisioning run than the server; ask the project lead for the current kit"]
        return [f"TLS handshake with {host}:{port} failed ({exc})"]
    except OSError as exc:
        return [f"{host}:{port} closed the connection during the TLS handshake ({exc}): the server probably does "
                f"not trust this kit's certificate (a kit from a different provisioning run)"]
    finally:
        raw.close()
    return []


def check_endpoint(host: str, port: int, root_ca: Path, cert: Path, key: Path, timeout: float = 5.0,
                   where: str = "") -> list[tuple[str, list[str]]]:
    """``[(check, problems)]`` for the three checks; after a failure the rest say they were not attempted."""
    results = []
    steps = ((NAME, lambda: check_name(host, port, where)), (PORT, lambda: check_port(host, port, timeout, where)),
             (TLS, lambda: check_tls(host, port, root_ca, cert, key, timeout, where)))
    failed = None
    for name, step in steps:
        if failed:
            results.append((name, [f"not attempted: the {failed} check failed"]))
            continue
        problems = step()
        results.append((name, problems))
        failed = name if problems else None
    return results


def check_kit(kit_dir: str | Path, timeout: float = 5.0) -> list[tuple[str, list[str]]]:
    """The three checks with a hospital's or an admin's kit (its server name, port, root CA and certificate)."""
    from fedmed.deploy.kit import ROOT_CA, STARTUP, read_kit

    kit = Path(kit_dir)
    info = read_kit(kit)
    startup = kit / STARTUP
    config = "fed_client.json" if info.kind == "client" else "fed_admin.json"
    return check_endpoint(info.host, info.port, startup / ROOT_CA, startup / info.cert, startup / info.key,
                          timeout, where=f"from {startup / config}")


def main(argv: list[str] | None = None) -> int:
    """``python -m fedmed.deploy.reachability KIT [TIMEOUT]``: print the three checks; exit 1 when one fails."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m fedmed.deploy.reachability KIT [TIMEOUT_SECONDS]", file=sys.stderr)
        return 2
    results = check_kit(argv[0], float(argv[1]) if len(argv) > 1 else 5.0)
    for name, problems in results:
        print(f"  {'FAIL' if problems else 'OK  '} {name}" + "".join(f"\n       - {p}" for p in problems))
    return 1 if any(problems for _, problems in results) else 0


if __name__ == "__main__":
    sys.exit(main())
