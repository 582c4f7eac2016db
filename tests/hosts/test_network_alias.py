"""A container on a named network is reached by its service's name (a network alias)."""

from __future__ import annotations

from pipeline.hosts.containers import ContainerSpec, create_kwargs


def _spec(network: str) -> ContainerSpec:
    return ContainerSpec(
        name="api-0123456789ab-r1", image="img", labels={"dev.pipeline.service": "api"},
        env={}, command=None, ports=(), volumes=(), cpus=None, memory=None,
        network=network, restart="no",
    )  # fmt: skip


def test_named_network_gives_the_service_name_as_alias() -> None:
    """On a named network the container joins it with its service's name as an alias, so that
    other containers (on other hosts too, over an overlay) reach `api` whatever its revision."""
    kwargs = create_kwargs(_spec("backend"))
    assert kwargs["network"] == "backend" and "network_mode" not in kwargs
    assert kwargs["networking_config"]["backend"]["Aliases"] == ["api"]


def test_built_in_networks_keep_network_mode() -> None:
    """bridge, host and none stay a network mode (Docker allows no alias there)."""
    for network in ("bridge", "host", "none"):
        kwargs = create_kwargs(_spec(network))
        assert kwargs["network_mode"] == network and "networking_config" not in kwargs
