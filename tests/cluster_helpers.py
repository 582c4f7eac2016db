"""A project under test on the Swarm lab: the sample app's images, services on `[clusters.lab]`
(or on the lab's hosts), a runner, and reads of what Swarm runs."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import httpx
from deploy_helpers import TEST_MONITOR

from pipeline.config.load import load
from pipeline.deploy.connections import Connections
from pipeline.deploy.runner import PassResult, Runner
from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app
from pipeline.retry import RetryPolicy
from pipeline.state.store import State


def health(monitor: str = TEST_MONITOR) -> str:
    return f'http = "/health"\ninterval = "200ms"\ntimeout = "4s"\nmonitor = "{monitor}"\n'


class ClusterProject:
    """Images `api{sfx}` and `web{sfx}` (the sample app in `api/` and `web/`) of one repo; the
    test writes the services (`write`), every name carrying this project's suffix."""

    def __init__(self, root: Path, remote: Any, lab: LabState) -> None:
        self.root, self.remote, self.lab = root, remote, lab
        self.sfx = uuid.uuid4().hex[:6]
        self.api, self.web = f"api{self.sfx}", f"web{self.sfx}"
        self.port = 19000 + int(self.sfx[:3], 16) % 900
        self.config = root / "pipeline.toml"
        self.addresses = [h.address for h in lab.hosts]

    def write(self, services: str) -> None:
        """The config: the lab's tables (registry, hosts, `[clusters.lab]`), the repo, the
        images `services` run, and `services`."""
        # An image no service runs would still be built on every pass: only those in use.
        images = "".join(
            f'[images.{name}]\nrepo = "shop"\ncontext = "{context}"\n\n'
            for name, context in ((self.api, "api"), (self.web, "web"))
            if f'image = "{name}"' in services
        )
        self.config.write_text(
            f'{self.lab.toml}\n[pipeline]\ndata_dir = "data"\n\n'
            f'[repos.shop]\nurl = "{self.remote.url}"\nbranch = "main"\n\n{images}{services}'
        )

    def initial_commit(self) -> str:
        write_sample_app(self.remote.work, "web", "web v1")
        write_sample_app(self.remote.work, "api", "api v1")
        return self.push("initial")

    def push(self, message: str) -> str:
        sha: str = self.remote.commit(message)
        self.remote.push()
        return sha

    def runner(self) -> Runner:
        loaded = load(self.config)
        no_sleep = RetryPolicy(sleep=lambda _s: None)
        return Runner(loaded, State.in_dir(loaded.data_dir), Connections(loaded, retry=no_sleep))

    def run(self) -> PassResult:
        runner = self.runner()
        try:
            return runner.run_pass()
        finally:
            runner.connections.close()

    # -- what runs ------------------------------------------------------------------------
    def client(self, index: int = 0) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.lab.hosts[index].docker_url, timeout=30)

    def tasks(self, service: str) -> list[dict[str, Any]]:
        """The service's tasks meant to run: node address, image, state, container id."""
        client = self.client()
        try:
            nodes = {n.id: n.attrs["Status"]["Addr"] for n in client.nodes.list()}
            out = []
            for t in client.api.tasks(filters={"service": service, "desired-state": "running"}):
                out.append(
                    {
                        "node": nodes.get(t["NodeID"]),
                        "image": t["Spec"]["ContainerSpec"]["Image"],
                        "state": t["Status"]["State"],
                        "container": t["Status"].get("ContainerStatus", {}).get("ContainerID"),
                    }
                )
            return out
        finally:
            client.close()

    def containers_of(self, service: str, index: int) -> str:
        """The id of the running container of host service `service` on lab host `index`."""
        client = self.client(index)
        try:
            (found,) = client.containers.list(filters={"label": f"dev.pipeline.service={service}"})
            return str(found.id)
        finally:
            client.close()

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.3)

    def get(self, address: str, port: int, path: str = "/") -> str:
        return httpx.get(f"http://{address}:{port}{path}", timeout=5).text

    def exec(self, address: str, container: str, cmd: list[str]) -> tuple[int, str]:
        """Run `cmd` in a container on the lab host at `address`."""
        index = self.addresses.index(address)
        client = self.client(index)
        try:
            code, out = client.containers.get(container).exec_run(cmd)
            return int(code), out.decode(errors="replace")
        finally:
            client.close()

    def cleanup(self) -> None:
        """Remove this project's Swarm services, containers and networks from the lab."""
        manager = self.client()
        try:
            for svc in manager.services.list():
                if self.sfx in svc.name:
                    svc.remove()
        finally:
            manager.close()
        for index in range(len(self.lab.hosts)):
            client = self.client(index)
            try:
                for c in client.containers.list(all=True, ignore_removed=True):
                    if self.sfx in (c.labels.get("dev.pipeline.service") or ""):
                        with contextlib.suppress(docker.errors.APIError):  # Swarm's, gone
                            c.remove(force=True)
            finally:
                client.close()
        manager = self.client()
        try:
            for _ in range(20):  # a network is busy until its service's tasks are gone
                nets = [n for n in manager.networks.list() if self.sfx in (n.name or "")]
                for net in nets:
                    with contextlib.suppress(docker.errors.APIError):
                        net.remove()
                if not nets:
                    break
                time.sleep(0.5)
        finally:
            manager.close()
