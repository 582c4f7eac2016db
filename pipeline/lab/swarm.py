"""The lab's hosts as one Docker Swarm: the first a manager, the others workers.

Verified on this machine (TESTBED.md, Swarm): the join crosses the lab bridge, so forwarding on
it must be accepted first (`net.accept_forwarding`), and every engine must start from an empty
data root (Swarm state lives there).
"""

from __future__ import annotations

from collections.abc import Sequence

import docker
import structlog

from pipeline.lab.registry import LabError

log = structlog.get_logger(__name__)

SWARM_PORT = 2377  # Swarm's cluster management port (Docker docs, "docker swarm init")
CLUSTER_NAME = "lab"  # the `[clusters.NAME]` table `pipeline lab up --swarm` prints


def form_swarm(hosts: Sequence[tuple[str, str]], *, timeout: float = 30.0) -> None:
    """Make `hosts` ((docker_url, address) pairs) one Swarm: `swarm init` on the first,
    advertising its lab address, then `swarm join` of each other one as a worker (the Docker
    SDK's `swarm.init` / `swarm.join`, as `docker swarm init/join` do). Raises LabError."""
    if not hosts:
        return
    (manager_url, manager_addr), *workers = hosts
    clients = [docker.DockerClient(base_url=url, timeout=int(timeout)) for url, _ in hosts]
    try:
        manager = clients[0]
        try:
            manager.swarm.init(
                advertise_addr=manager_addr, listen_addr=f"{manager_addr}:{SWARM_PORT}"
            )
            manager.swarm.reload()
            token = manager.swarm.attrs["JoinTokens"]["Worker"]
        except docker.errors.APIError as exc:
            raise LabError(f"swarm init on {manager_url}: {exc.explanation or exc}") from exc
        for client, (url, addr) in zip(clients[1:], workers, strict=True):
            try:
                client.swarm.join(
                    remote_addrs=[f"{manager_addr}:{SWARM_PORT}"],
                    join_token=token,
                    advertise_addr=addr,
                    listen_addr=f"{addr}:{SWARM_PORT}",
                )
            except docker.errors.APIError as exc:
                raise LabError(f"swarm join of {url}: {exc.explanation or exc}") from exc
        log.info("lab.swarm", manager=manager_url, workers=[u for u, _ in workers])
    finally:
        for client in clients:
            client.close()
