"""A tiny real FLARE deployment on 127.0.0.1 for the privacy acceptance tests.

Real ``nvflare provision``, a real server and real clients as
separate processes started from their kits, jobs submitted through the admin API. Each site's
``local/privacy.json`` is the project's template unless a test gives its own. Processes started
here are stopped by PID; nothing is written outside the test's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedmed.flare.allow_list import class_allow_list
from fedmed.privacy.scopes import template_privacy_file

PROJECT = "privacytest"
ADMIN = "admin@fedmed.org"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_job(dest: Path, num_rounds: int = 1, scope: str | None = None, width: int | None = 8, min_clients: int = 2) -> Path:
    """The project's CXR job, shrunk: few rounds, a narrow network, FedAvg only.

    These jobs test what travels, not what is learned: a round or two (DP ones especially) on a few dozen
    images need not beat the initial model, so the release gate releases the initial model on a collapse
    (``release_on_collapse: initial``, saying so) instead of failing the job."""
    shutil.copytree(REPO / "jobs" / "cxr_pneumonia_fedavg", dest)
    server_path = dest / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_path.read_text())
    server["workflows"] = [w for w in server["workflows"] if w["path"] == "fedmed.flare.controller.FedAvgController"]
    args = server["workflows"][0]["args"]
    args.update({"num_rounds": num_rounds, "min_clients": min_clients, "wait_after_min_clients": 5, "round_timeout": 600,
                 "release_on_collapse": "initial"})
    if width is not None:  # a narrow network: fast on CPU
        network = args["network"]
        if network["name"] == "small_cnn":
            network["args"]["width"] = width
        elif network["name"] == "cxr_cnn":
            network["args"]["channels"] = [width, width, width]
        else:
            raise ValueError(f"tiny_job: no narrow variant of network {network['name']!r}")
    server_path.write_text(json.dumps(server, indent=2))
    client_path = dest / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_path.read_text())
    client["executors"][0]["executor"].setdefault("args", {}).update({"local_epochs": 1, "batch_size": 16, "amp": False})
    client_path.write_text(json.dumps(client, indent=2))
    meta = json.loads((dest / "meta.json").read_text())
    meta["min_clients"] = min_clients
    if scope is not None:
        meta["scope"] = scope
    (dest / "meta.json").write_text(json.dumps(meta, indent=2))
    return dest


class LoopbackFederation:
    def __init__(self, root: Path, sites=("site-1", "site-2"), site_privacy: dict | None = None,
                 num_train: int = 48, num_val: int = 24, site_configs: dict | None = None,
                 server_privacy: Path | None = None):
        self.root = Path(root)
        self.sites = list(sites)
        self.site_privacy = site_privacy or {}
        self.num_train, self.num_val = num_train, num_val
        self.site_configs = site_configs or {}  # {site: {"data": {...}}}; default tiny synthetic data
        self.server_privacy = server_privacy  # the server's local/privacy.json (default: the project's template)
        self.procs: dict[str, subprocess.Popen] = {}
        self.kits: dict[str, Path] = {}
        self.session = None

    # -- provisioning ------------------------------------------------------------------------
    def provision(self) -> None:
        fl_port, admin_port = free_port(), free_port()
        participants = [
            {"name": "localhost", "type": "server", "org": "fedmed", "fed_learn_port": fl_port, "admin_port": admin_port},
            *({"name": site, "type": "client", "org": "fedmed"} for site in self.sites),
            {"name": ADMIN, "type": "admin", "org": "fedmed", "role": "project_admin"},
        ]
        builders = [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
        ]
        builders += [{"path": "nvflare.lighter.impl.cert.CertBuilder"}, {"path": "nvflare.lighter.impl.signature.SignatureBuilder"}]
        project = {"api_version": 3, "name": PROJECT, "description": "privacy tests", "participants": participants, "builders": builders}
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "project.yml").write_text(json.dumps(project))  # YAML is a superset of JSON
        out = subprocess.run(
            [sys.executable, "-m", "nvflare.cli", "provision", "-p", str(self.root / "project.yml"), "-w", str(self.root / "prov")],
            capture_output=True, text=True, timeout=120, cwd=self.root,
        )
        if out.returncode != 0:
            raise RuntimeError(f"nvflare provision failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        prod = self.root / "prov" / PROJECT / "prod_00"
        self.kits = {name: prod / name for name in ["localhost", *self.sites, ADMIN]}
        for name in ["localhost", *self.sites]:
            self._write_local(name)

    def _write_local(self, name: str) -> None:
        kit = self.kits[name]
        local = kit / "local"
        resources = json.loads((local / "resources.json.default").read_text())
        resources["class_allow_list"] = class_allow_list()
        if name == "localhost":
            storage = self.root / "server_storage"
            resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = str(storage / "snapshot-storage")
            for component in resources["components"]:
                if component["id"] == "job_manager":
                    component["args"]["uri_root"] = str(storage / "jobs-storage")
            shutil.copy(self.server_privacy or template_privacy_file("server"), local / "privacy.json")
        else:
            # log streaming as the project's client template sets it (off; FLARE's default kit streams site logs)
            template = json.loads((template_privacy_file("client").parent / "resources.json").read_text())
            resources["allow_log_streaming"] = template["allow_log_streaming"]
            resources["components"] = [c for c in resources["components"] if "LogStreamer" not in c.get("path", "")
                                       or any(c.get("path") == t.get("path") for t in template["components"])]
            shutil.copy(self.site_privacy.get(name, template_privacy_file("client")), local / "privacy.json")
            index = self.sites.index(name)
            site_config = self.site_configs.get(name) or {
                "data": {"format": "synthetic", "num_train": self.num_train, "num_val": self.num_val, "seed": 11 + index}
            }
            (local / "fedmed_site.json").write_text(json.dumps(site_config))
        (local / "resources.json").write_text(json.dumps(resources, indent=2))

    # -- processes ---------------------------------------------------------------------------
    def _start(self, name: str, module: str, extra: list[str]) -> None:
        kit = self.kits[name]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log = open(kit / "process.log", "w")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-u", "-m", module, "-m", str(kit), *extra],
            cwd=kit, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def _wait_for(self, name: str, text: str, deadline_s: float) -> None:
        log = self.kits[name] / "log.txt"
        end = time.time() + deadline_s
        while time.time() < end:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}; see {self.kits[name] / 'process.log'}")
            if log.exists() and text in log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{name}: '{text}' not in {log} after {deadline_s:.0f} s")

    def start(self) -> None:
        self._start("localhost", "nvflare.private.fed.app.server.server_train",
                    ["-s", "fed_server.json", "--set", "secure_train=true", "config_folder=config", "org=fedmed"])
        time.sleep(3)
        for site in self.sites:
            self._start(site, "nvflare.private.fed.app.client.client_train",
                        ["-s", "fed_client.json", "--set", "secure_train=true", f"uid={site}", "config_folder=config", "org=fedmed"])
        for site in self.sites:
            self._wait_for(site, "Successfully registered", 120)
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        self.session = new_secure_session(ADMIN, str(self.kits[ADMIN]), timeout=30)

    def run_job(self, job_dir: Path, timeout: float = 300) -> tuple[str, dict, Path | None]:
        """Submit, wait, download: (job id, job meta, downloaded result folder or None)."""
        job_id = self.session.submit_job(str(job_dir))
        end = time.time() + timeout
        meta = {}
        while time.time() < end:
            meta = self.session.get_job_meta(job_id)
            if str(meta.get("status", "")).startswith("FINISHED"):
                break
            time.sleep(2)
        else:
            raise TimeoutError(f"job {job_id} still {meta.get('status')} after {timeout} s")
        try:
            result = Path(self.session.download_job_result(job_id))
        except Exception:  # noqa: BLE001 - a refused job may have no result
            result = None
        return job_id, meta, result

    def site_log(self, site: str) -> str:
        return (self.kits[site] / "log.txt").read_text(errors="replace")

    def stop(self) -> None:
        if self.session is not None:
            try:
                self.session.shutdown_system()
            except Exception:  # noqa: BLE001 - fall through to stopping by PID
                pass
            try:
                self.session.close()
            except Exception:  # noqa: BLE001
                pass
        end = time.time() + 20
        for name, proc in self.procs.items():
            while proc.poll() is None and time.time() < end:
                time.sleep(0.5)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
