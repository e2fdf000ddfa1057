"""``python -m fedmed stop KIT server|all|client NAME...``: stop a deployment's server or sites and say what happened.

``KIT`` is an admin startup kit. Who may stop what is the kits' policy
(``workspace_templates/*/local/authorization.json``): the project admin (``admin@...``) may stop the
server, every site or all; a hospital's org admin (``it@hospital-NN...``) only that hospital's site;
the lead researcher nothing. FLARE 2.9's ``nvflare system shutdown`` reports a refusal as
``CONNECTION_FAILED`` ("Could not connect to the FLARE server"), and a site's refusal as "failed to
shut down all clients" with no reason; this command tells a refusal, a server that cannot be reached
and a stop that worked apart, and checks afterwards that the server or the sites are really gone.

FLARE does not stop a server or a site while a job runs there; this command says so and how to
abort the job.

Exit codes: 0 stopped; 1 refused or not stopped (the reason printed); 2 the server cannot be reached
or the kit is not an admin kit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import socket
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kit", help="your admin startup kit (the project admin's to stop the server; a hospital's "
                        "it@... kit to stop that hospital's site)")
    parser.add_argument("target", choices=("server", "all", "client"),
                        help="server (the server; sites keep retrying until it is back), all (server and every "
                        "site), or client NAME... (those sites)")
    parser.add_argument("clients", nargs="*", help="site names for 'client' (e.g. hospital-07)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the stop (default 60)")


def _server_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _connected(session) -> list[str]:
    return sorted(c.name for c in session.get_connected_client_list())


def main(args: argparse.Namespace) -> int:
    from nvflare.fuel.flare_api.api_spec import AuthorizationError, NoConnection
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    from fedmed.deploy import kit as kit_files

    if args.target == "client" and not args.clients:
        print("stop: name the site(s) to stop, e.g. `client hospital-07`", file=sys.stderr)
        return 2
    try:
        info = kit_files.read_admin_kit(args.kit, "the project admin's, or your hospital's it@... kit")
    except kit_files.KitError as exc:
        print(f"stop: {exc}", file=sys.stderr)
        return 2
    user = info.name
    what = {"server": "the server", "all": "the server and every site"}.get(args.target, ", ".join(args.clients))
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # the admin API logs connection errors itself; we say what happened
    try:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # "Connecting to FLARE ..."
                session = new_secure_session(user, str(Path(args.kit).resolve()), timeout=min(args.timeout, 10.0))
        except (NoConnection, ConnectionError, TimeoutError) as exc:
            print(f"stop: cannot reach the server {info.host}:{info.port} with {user}'s kit ({exc}); is it running? "
                  f"(`python -m fedmed preflight {args.kit}` checks the connection)", file=sys.stderr)
            return 2
        try:
            before = _connected(session)
            if args.target == "client":
                unknown = [c for c in args.clients if c not in before]
                if unknown:
                    print(f"stop: {', '.join(unknown)} not connected to the server (connected: {', '.join(before) or 'none'})",
                          file=sys.stderr)
                    return 1
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # the API reconnects while it waits, printing each time
                    session.shutdown(args.target, args.clients or None, wait=True, timeout=args.timeout)
            except AuthorizationError as exc:
                print(f"stop: REFUSED: {user} may not stop {what} ({exc}). The project admin's kit stops the server; "
                      f"a hospital's it@... kit stops only that hospital's site.", file=sys.stderr)
                return 1
            except Exception as exc:  # FLARE: 'failed to shut down all clients' (a site's own policy refused) or a timeout
                if "still running" in str(exc):  # FLARE refuses to stop while a job runs (JobNotDone)
                    print(f"stop: NOT STOPPED: {exc}. Wait until it ends, or abort it first "
                          f"(`nvflare job abort JOB_ID --force --startup-kit <the submitter's kit>`), then stop again.",
                          file=sys.stderr)
                    return 1
                if args.target == "client":
                    still = [c for c in args.clients if c in _connected(session)]
                    if still:
                        print(f"stop: NOT STOPPED: {', '.join(still)} still connected. FLARE says only '{exc}'; the "
                              f"usual reason is that the site's own policy (local/authorization.json) refuses {user}: a "
                              f"hospital's it@... kit stops only its own site, the project admin's kit any site.",
                              file=sys.stderr)
                        return 1
                elif _server_reachable(info.host, info.port):
                    print(f"stop: NOT STOPPED: the server {info.host}:{info.port} still answers ({type(exc).__name__}: {exc})",
                          file=sys.stderr)
                    return 1
        finally:
            with contextlib.suppress(Exception):
                session.close()
        if args.target in ("server", "all"):
            deadline = time.time() + args.timeout
            while _server_reachable(info.host, info.port) and time.time() < deadline:
                time.sleep(0.5)
            if _server_reachable(info.host, info.port):
                print(f"stop: NOT STOPPED: the server {info.host}:{info.port} still answers after {args.timeout:.0f} s",
                      file=sys.stderr)
                return 1
            left = "" if args.target == "all" else (f"; sites {', '.join(before)} keep running and retry until a server is "
                                                   f"back (stop them with `all`, or each hospital with its own kit)" if before else "")
            print(f"stopped {what} ({info.host}:{info.port}) as {user}{left}")
        else:
            print(f"stopped {what} as {user}")
        return 0
    finally:
        logging.disable(previous)
