"""One Docker engine behind a narrow interface: images here, containers in `engine.containers`.

Calls that are safe to repeat (pull, image inspection) are retried under the engine's
`RetryPolicy` when the error is transient: a registry the engine cannot reach answers a pull with
a 500 ("dial tcp ...: connect: connection refused", "context deadline exceeded", "TLS handshake
timeout"), an engine that does not answer raises a requests connection error or timeout.

The docker SDK is reached only through `pipeline.hosts.connection.Connection`, which makes every
docker/requests exception one of pipeline's error kinds, with a message naming the engine
(`host lab-1 (tcp://10.88.0.2:2375): ...`) and never a credential.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import docker.errors
import structlog

from pipeline.config.model import HostSection
from pipeline.errors import StallingError
from pipeline.hosts.connection import (
    Connection,
    EngineError,
    ImageNotFound,
    RegistryAuthError,
    status_of,
    stream_error,
)
from pipeline.hosts.containers import (
    LABEL_PREFIX,
    ContainerInfo,
    Containers,
    ContainerSpec,
)
from pipeline.hosts.dockercli import run_build
from pipeline.hosts.proxy import ProxyContainer
from pipeline.hosts.sessions import Sessions
from pipeline.hosts.swarm import Swarm
from pipeline.redact import redact, redact_url
from pipeline.retry import RetryPolicy

__all__ = [
    "LABEL_PREFIX",
    "ContainerInfo",
    "ContainerSpec",
    "Engine",
    "EngineError",
    "ImageNotFound",
    "RegistryAuthError",
]

log = structlog.get_logger(__name__)

_BUILD_TAIL = 10
_BUILD_STEP = re.compile(r"^Step (\d+)/(\d+) :")

# Where long work says how far it is: (what, done, total) — bytes of a push or pull summed
# over its layers, or steps of a legacy build; total None while unknown.
Progress = Callable[[str, int, int | None], None]


def layer_progress(layers: dict[str, tuple[int, int]], chunk: Mapping[str, Any]) -> bool:
    """Fold one push/pull stream message into `layers` (layer id -> (current, total) bytes);
    True when it changed them. Docker's messages: {"id", "status": "Pushing"|"Downloading"|…,
    "progressDetail": {"current", "total"}}; a finished layer ("Pushed", "Pull complete",
    "Layer already exists", "Already exists") counts as all done."""
    layer = chunk.get("id")
    if not layer:
        return False
    detail = chunk.get("progressDetail") or {}
    status = str(chunk.get("status") or "")
    seen = layers.get(layer, (0, 0))
    if detail.get("total"):
        layers[layer] = (int(detail.get("current") or 0), int(detail["total"]))
        return True
    if status in ("Pushed", "Pull complete", "Layer already exists", "Already exists"):
        layers[layer] = (seen[1], seen[1])
        return True
    return False


_BUILD_TIMEOUT = 3600  # seconds without output before a build's HTTP read gives up


class _CachedLayerGone(StallingError):
    """A legacy build's cached layer was removed while the build used it."""


class Engine:
    """A Docker engine behind `conn` (its name, URL and client, connected on first use).

    Its containers are `engine.containers` (a `Containers` over the same connection). Retries
    of safe calls follow `retry`."""

    def __init__(self, conn: Connection, *, retry: RetryPolicy | None = None) -> None:
        self.name, self.url = conn.name, conn.url
        self._conn = conn
        self.retry = retry or RetryPolicy()
        self.containers = Containers(conn)
        self.proxy = ProxyContainer(conn)
        self.swarm = Swarm(conn)  # the Swarm it belongs to, if any (`pipeline.hosts.swarm`)
        self.progress: Progress | None = None  # set by whoever shows progress (the CLI)
        self.sessions = Sessions(conn)

    @classmethod
    def from_host(
        cls, name: str, host: HostSection, base_dir: Path, *, retry: RetryPolicy | None = None
    ) -> Engine:
        """An engine for a `[hosts.NAME]` table; relative TLS paths are resolved from base_dir."""

        def path(value: str | None) -> str | None:
            return str(base_dir / value) if value else None

        return cls(
            Connection(
                name,
                host.docker,
                tls_ca=path(host.tls_ca),
                tls_cert=path(host.tls_cert),
                tls_key=path(host.tls_key),
            ),
            retry=retry,
        )

    @classmethod
    def local(cls, *, retry: RetryPolicy | None = None) -> Engine:
        """The machine's own engine: DOCKER_HOST if set, else the default unix socket."""
        url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return cls(Connection("local", url), retry=retry)

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, {redact_url(self.url)!r})"

    def close(self) -> None:
        """Close the connection; a later call reconnects."""
        self._conn.close()

    def ping(self) -> None:
        """Raise EngineError unless the engine answers."""
        with self._conn.calling("ping"):
            self._conn.client.ping()

    # -- images -----------------------------------------------------------------------------

    def build(
        self,
        context: Path,
        dockerfile: str,
        tags: Sequence[str],
        *,
        labels: Mapping[str, str],
        build_args: Mapping[str, str],
        pull: bool = False,
        target: str | None = None,
        on_output: Callable[[str], None] | None = None,
    ) -> str:
        """Build `context` (dockerfile relative to it) with the engine's legacy builder (the only
        one the SDK drives), stopping at stage `target` if given; tag it with every tag and
        return the image id.

        A failing step raises StallingError("build failed: ...") with the last output lines. A
        cached layer removed while the build used it (a concurrent `docker image prune` or
        `rmi`: "unable to find image") is built again once, without the cache.
        """
        request: dict[str, Any] = {
            "path": str(context),
            "dockerfile": dockerfile,
            "tag": tags[0] if tags else None,
            "labels": dict(labels),
            "buildargs": dict(build_args),
            "pull": pull,
            "target": target,
        }
        try:
            image_id = self._build_once(request, context, on_output, nocache=False)
        except _CachedLayerGone:
            image_id = self._build_once(request, context, on_output, nocache=True)
        for extra in tags[1:]:
            repo, _, tag = extra.rpartition(":") if ":" in extra.split("/")[-1] else (extra, "", "")
            self.tag(image_id, repo, tag or "latest")
        log.info("image built", host=self.name, image=image_id, tags=list(tags))
        return image_id

    def _build_once(
        self,
        request: Mapping[str, Any],
        context: Path,
        on_output: Callable[[str], None] | None,
        *,
        nocache: bool,
    ) -> str:
        """One legacy build of `request` (APIClient.build's arguments); its image id."""
        tail: deque[str] = deque(maxlen=_BUILD_TAIL)
        image_id: str | None = None
        with self._conn.calling(f"build {context}"):
            stream = self._conn.client.api.build(
                **request, nocache=nocache, rm=True, forcerm=True, decode=True,
                timeout=_BUILD_TIMEOUT,
            )  # fmt: skip
            for chunk in stream:
                reported = stream_error(chunk)
                if reported is not None:
                    message, output = reported[0], "\n".join(tail)
                    detail = f"{redact(message)}\n{redact(output)}".rstrip()
                    gone = not nocache and message.startswith('unable to find image "sha256:')
                    raise (_CachedLayerGone if gone else StallingError)(
                        f"build failed: {self._conn.where}: {detail}"
                    )
                text = chunk.get("stream")
                if text and self.progress and (step := _BUILD_STEP.match(str(text))):
                    self.progress(f"{self.name}: build {context.name}", int(step[1]),
                                  int(step[2]))  # fmt: skip
                if text:
                    for line in str(text).splitlines():
                        if line.strip():
                            tail.append(line)
                            if on_output:
                                on_output(line)
                aux = chunk.get("aux") or {}
                if isinstance(aux, dict) and aux.get("ID"):
                    image_id = str(aux["ID"])
                match = re.match(r"Successfully built ([0-9a-f]+)", str(text or ""))
                if match and image_id is None:
                    image_id = match.group(1)
        if image_id is None:
            raise StallingError(
                f"build failed: {self._conn.where}: no image id in the build output"
            )
        if not image_id.startswith("sha256:"):
            image_id = str(self._inspect_image(image_id)["Id"])
        return image_id

    def build_cli(
        self,
        cli: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        iidfile: Path,
        on_output: Callable[[str], None] | None = None,
    ) -> str:
        """Build with the docker CLI at `cli` against this engine: `cli`, the engine's global
        flags (-H, TLS), then `args` (`build ...` or `buildx build ...`, made by
        `pipeline.build.buildkit.build_args`); return the image id written to `iidfile`.

        A failed build raises StallingError("build failed: host NAME (URL): ...") with the last
        output lines, credentials and registered secrets masked."""
        image_id = run_build(
            [cli, *self._conn.cli_flags(), *args],
            env=env,
            where=self._conn.where,
            iidfile=iidfile,
            on_output=on_output,
        )
        log.info("image built", host=self.name, image=image_id, builder=Path(cli).name)
        return image_id

    def push(
        self,
        repository: str,
        tag: str,
        *,
        auth: Mapping[str, str] | None,
        on_output: Callable[[str], None] | None = None,
    ) -> str:
        """Push repository:tag and return the registry's manifest digest ("sha256:...")."""
        action = f"push {repository}:{tag}"
        secrets = [auth.get("password", "")] if auth else []
        digest: str | None = None
        with self._conn.calling(action, secrets=secrets):
            stream = self._conn.client.api.push(
                repository,
                tag=tag,
                stream=True,
                decode=True,
                auth_config=dict(auth) if auth else None,
            )
            layers: dict[str, tuple[int, int]] = {}
            for chunk in stream:
                self._conn.raise_stream_error(chunk, action, secrets)
                self._bytes(f"push {repository}", layers, chunk)
                aux = chunk.get("aux") or {}
                if isinstance(aux, dict) and aux.get("Digest"):
                    digest = str(aux["Digest"])
                if on_output and chunk.get("status") and not chunk.get("progressDetail"):
                    on_output(" ".join(str(chunk[k]) for k in ("id", "status") if chunk.get(k)))
        if digest is None:
            raise EngineError(f"{self._conn.where}: {action}: the push reported no digest")
        log.info("image pushed", host=self.name, image=f"{repository}:{tag}", digest=digest)
        return digest

    def pull(self, ref: str, *, auth: Mapping[str, str] | None) -> str:
        """Pull `ref` (name:tag or name@digest) and return the local image id; a transient
        failure (registry or engine unreachable, a timeout, a 5xx) is retried."""
        action = f"pull {ref}"
        image_id = self.retry.call(
            lambda: self._pull_once(ref, auth), f"{self._conn.where}: {action}"
        )
        log.info("image pulled", host=self.name, image=ref)
        return image_id

    def _pull_once(self, ref: str, auth: Mapping[str, str] | None) -> str:
        action = f"pull {ref}"
        secrets = [auth.get("password", "")] if auth else []
        with self._conn.calling(action, not_found=ImageNotFound, secrets=secrets):
            stream = self._conn.client.api.pull(
                ref, stream=True, decode=True, auth_config=dict(auth) if auth else None
            )
            layers: dict[str, tuple[int, int]] = {}
            for chunk in stream:
                self._conn.raise_stream_error(chunk, action, secrets, not_found=ImageNotFound)
                self._bytes(f"pull on {self.name}", layers, chunk)
            return str(self._conn.client.api.inspect_image(ref)["Id"])

    def _bytes(self, what: str, layers: dict[str, tuple[int, int]], chunk: Any) -> None:
        if self.progress and isinstance(chunk, dict) and layer_progress(layers, chunk):
            done = sum(c for c, _t in layers.values())
            self.progress(what, done, sum(t for _c, t in layers.values()) or None)

    def _inspect_image(self, ref: str) -> dict[str, Any]:
        action = f"inspect image {ref}"

        def once() -> dict[str, Any]:
            with self._conn.calling(action, not_found=ImageNotFound):
                return dict(self._conn.client.api.inspect_image(ref))

        return self.retry.call(once, f"{self._conn.where}: {action}")

    def exposed_ports(self, ref: str) -> list[str] | None:
        """The ports the image declares (`EXPOSE`, e.g. ["8080/tcp"]); None when the image is
        not on the engine."""
        try:
            attrs = self._inspect_image(ref)
        except ImageNotFound:
            return None
        return sorted((attrs.get("Config") or {}).get("ExposedPorts") or {})

    def has_image(self, ref: str) -> bool:
        """True when the engine holds an image for `ref` (id, tag or repo@digest)."""
        try:
            self._inspect_image(ref)
        except ImageNotFound:
            return False
        return True

    def tag(self, image: str, repository: str, tag: str) -> None:
        """Tag an image (id or ref) as repository:tag."""
        with self._conn.calling(f"tag {image} as {repository}:{tag}", not_found=ImageNotFound):
            self._conn.client.api.tag(image, repository, tag=tag, force=True)

    def remove_image(self, ref: str) -> None:
        """Remove an image or untag a ref; an image in use or already gone is left alone."""
        with self._conn.calling(f"remove image {ref}"):
            try:
                self._conn.client.api.remove_image(ref)
            except docker.errors.APIError as exc:
                # 409: in use by a container or referenced by several repositories; keep it.
                if status_of(exc) not in (404, 409):
                    raise

    def images_labelled(self, label: str, value: str) -> list[tuple[str, int]]:
        """(id, created epoch seconds) of the images carrying label=value, newest first."""
        with self._conn.calling(f"list images {label}={value}"):
            found = self._conn.client.api.images(filters={"label": f"{label}={value}"})
        return sorted(((i["Id"], int(i.get("Created", 0))) for i in found), key=lambda x: -x[1])

    def image_details(self, label: str, value: str) -> list[dict[str, Any]]:
        """The images carrying label=value as Docker lists them: "Id", "Created" (epoch s),
        "Size" (bytes), "RepoDigests" (repo@sha256:… refs), newest first."""
        with self._conn.calling(f"list images {label}={value}"):
            found = self._conn.client.api.images(filters={"label": f"{label}={value}"})
        return sorted(found, key=lambda i: -int(i.get("Created", 0)))
