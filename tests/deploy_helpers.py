"""A project under test on the lab: a real git remote with the sample app, a config, a runner."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import httpx

from pipeline.config.load import load
from pipeline.deploy.connections import Connections
from pipeline.deploy.runner import PassResult, Runner
from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app
from pipeline.retry import RetryPolicy
from pipeline.state.store import State

# Tests watch new containers briefly: the 5 s default monitoring window would make every
# rollout in the suite 5 s slower per host. Tests of the window itself set their own.
TEST_MONITOR = "300ms"


class Project:
    """Two images (`web/`, `api/`) in one repo, their services on the lab hosts."""

    def __init__(
        self,
        root: Path,
        remote: Any,
        lab: LabState,
        *,
        extra: str = "",
        hosts: int = 2,
        registry: str | None = None,
        no_registry: bool = False,
    ) -> None:
        self.root, self.remote, self.lab = root, remote, lab
        self.suffix = uuid.uuid4().hex[:6]
        self.web, self.api = f"web{self.suffix}", f"api{self.suffix}"
        self.host_names = [h.name for h in lab.hosts[:hosts]]
        self.registry = None if no_registry else (registry or lab.registry)
        self.extra = extra
        self.web_port, self.api_port = 18000 + int(self.suffix[:3], 16) % 900, 0
        self.api_port = self.web_port + 1000
        self.config = root / "pipeline.toml"
        self.write_config()

    def write_config(self, **service_extra: str) -> None:
        """Write the config; `service_extra` keys: web_ports, web (more keys of web), web_timeout,
        web_health (web's whole health table, "" for none)."""
        web_health = (
            f'[services.{self.web}.health]\nhttp = "/health"\ninterval = "200ms"\n'
            f'timeout = "{service_extra.get("web_timeout", "10s")}"\nmonitor = "{TEST_MONITOR}"'
        )
        hosts = "\n".join(
            f'[hosts.{h.name}]\ndocker = "{h.docker_url}"\naddress = "{h.address}"\n'
            for h in self.lab.hosts
        )
        host_list = json.dumps(self.host_names)
        registry = f'[registry]\naddress = "{self.registry}"\n' if self.registry else ""
        self.config.write_text(f"""
[pipeline]
data_dir = "data"

{registry}
{hosts}
[repos.shop]
url = "{self.remote.url}"
branch = "main"

[images.{self.web}]
repo = "shop"
context = "web"

[images.{self.api}]
repo = "shop"
context = "api"

[services.{self.web}]
image = "{self.web}"
hosts = {host_list}
{service_extra.get("web_ports", f'ports = ["{self.web_port}:8080"]')}
stop_timeout = "1s"
{service_extra.get("web", "")}

{service_extra.get("web_health", web_health)}

[services.{self.api}]
image = "{self.api}"
hosts = {host_list}
ports = ["{self.api_port}:8080"]
stop_timeout = "1s"

[services.{self.api}.health]
http = "/health"
interval = "200ms"
timeout = "10s"
monitor = "{TEST_MONITOR}"
{self.extra}
""")

    # -- git ------------------------------------------------------------------------------
    def initial_commit(self) -> str:
        write_sample_app(self.remote.work, "web", "web v1")
        write_sample_app(self.remote.work, "api", "api v1")
        self.remote.write("web/.dockerignore", "*.md\n")
        return self.push("initial")

    def push(self, message: str) -> str:
        sha: str = self.remote.commit(message)
        self.remote.push()
        return sha

    # -- pipeline -------------------------------------------------------------------------
    def runner(self) -> Runner:
        loaded = load(self.config)
        state = State.in_dir(loaded.data_dir)
        # Retries do not sleep in these tests: a registry that is down stays down within one pass.
        no_sleep = RetryPolicy(sleep=lambda _s: None)
        return Runner(loaded, state, Connections(loaded, retry=no_sleep), sleep=lambda _s: None)

    def run(self) -> PassResult:
        runner = self.runner()
        try:
            return runner.run_pass()
        finally:
            runner.connections.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )

    # -- hosts ----------------------------------------------------------------------------
    def get(self, host_index: int, port: int) -> str:
        address = self.lab.hosts[host_index].address
        return httpx.get(f"http://{address}:{port}/", timeout=5).text

    def containers(self, service: str) -> dict[str, list[str]]:
        """Host name -> ids of the service's running containers."""
        out = {}
        for h in self.lab.hosts:
            client = docker.DockerClient(base_url=h.docker_url)
            try:
                out[h.name] = [
                    c.id
                    for c in client.containers.list(
                        filters={"label": f"dev.pipeline.service={service}"}
                    )
                ]
            finally:
                client.close()
        return out

    def cleanup(self) -> None:
        """Remove every container of this project's services from the lab hosts."""
        for h in self.lab.hosts:
            client = docker.DockerClient(base_url=h.docker_url)
            try:
                for svc in (self.web, self.api):
                    for c in client.containers.list(
                        all=True,
                        filters={"label": f"dev.pipeline.service={svc}"},
                        ignore_removed=True,
                    ):
                        c.remove(force=True)
            finally:
                client.close()


def one_service_config(registry: str, host_table: str, repo_url: str, name: str, port: int) -> str:
    """A config deploying the sample app (context `web/`) as service `name` on the one host
    `host_table` describes (a `[hosts.NAME]` table), health-checked on `port`."""
    return f"""
[registry]
address = "{registry}"

{host_table}

[repos.app]
url = "{repo_url}"

[images.{name}]
repo = "app"
context = "web"

[services.{name}]
image = "{name}"
hosts = ["{host_table.split(".", 1)[1].split("]", 1)[0]}"]
ports = ["{port}:8080"]

[services.{name}.health]
http = "/health"
interval = "200ms"
timeout = "15s"
monitor = "{TEST_MONITOR}"
"""


# -- a registry one host cannot reach -----------------------------------------------------


class RegistryBlock:
    """An iptables rule in one lab host's network namespace rejecting its connections to the
    lab registry; `packets` says how many it rejected."""

    def __init__(self, lab: LabState, index: int) -> None:
        hosts = json.loads((lab.dir / "lab.json").read_text())["hosts"]
        self.nsenter = ["nsenter", f"--net=/var/run/netns/{hosts[index]['namespace']}", "--"]
        address, port = lab.registry.rsplit(":", 1)
        self.rule = ["OUTPUT", "-d", address, "-p", "tcp", "--dport", port, "-j", "REJECT"]
        self.packets = 0
        self._lock = threading.Lock()
        self._on = False

    def add(self) -> None:
        subprocess.run([*self.nsenter, "iptables", "-I", *self.rule], check=True)
        self._on = True

    def remove(self) -> None:
        """Delete the rule (once; later calls do nothing), keeping its packet count."""
        with self._lock:
            if not self._on:
                return
            listing = subprocess.run(
                [*self.nsenter, "iptables", "-L", "OUTPUT", "-v", "-n", "-x"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            for line in listing.splitlines():
                if "REJECT" in line and re.search(rf"dpt:{self.rule[6]}\b", line):
                    self.packets += int(line.split()[0])
            subprocess.run([*self.nsenter, "iptables", "-D", *self.rule], check=False)
            self._on = False


@contextmanager
def registry_blocked(lab: LabState, index: int) -> Iterator[RegistryBlock]:
    """Host `index` cannot reach the registry inside the block; the rule is removed on exit
    whatever happens (a timer may remove it earlier)."""
    block = RegistryBlock(lab, index)
    block.add()
    try:
        yield block
    finally:
        block.remove()
