"""One Docker engine behind a narrow interface: the only module that talks to the docker SDK.

Every docker/requests exception is translated in `_translate` into pipeline's error kinds, with a
message naming the engine (`host lab-1 (tcp://10.88.0.2:2375): ...`) and never a credential.
"""

from __future__ import annotations

import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.tls
import requests.exceptions
import structlog

from pipeline.config.model import HostSection
from pipeline.errors import PipelineError, StallingError, TransientError
from pipeline.hosts.containers import (
    LABEL_PREFIX,
    MANAGED_LABEL,
    SERVICE_LABEL,
    ContainerInfo,
    ContainerOps,
    ContainerSpec,
    container_info,
    create_kwargs,
    status_of,
)
from pipeline.redact import redact, redact_url

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

_AUTH_MARKERS = ("unauthorized", "authentication required", "no basic auth credentials", "denied:")
_NOT_FOUND_MARKERS = ("manifest unknown", "not found", "no such image")
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")
_OTHER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)
_BUILD_TAIL = 10
_BUILD_TIMEOUT = 3600  # seconds without output before a build's HTTP read gives up


class EngineError(TransientError):
    """The engine could not be reached or failed (connection refused, 5xx); retried."""


class RegistryAuthError(StallingError):
    """The registry refused the credentials (401/403); retrying cannot help."""


class ImageNotFound(StallingError):
    """The image (usually a digest) does not exist in the registry or on the engine."""


class Engine(ContainerOps):
    """A Docker engine reached at `url`, named after its config host; connects on first use."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        timeout: float = 60,
    ) -> None:
        self.name = name
        self.url = url
        self._tls_ca, self._tls_cert, self._tls_key = tls_ca, tls_cert, tls_key
        self._timeout = timeout
        self._lock = threading.Lock()
        self._docker: Any = None

    @classmethod
    def from_host(cls, name: str, host: HostSection, base_dir: Path) -> Engine:
        """An engine for a `[hosts.NAME]` table; relative TLS paths are resolved from base_dir."""

        def path(value: str | None) -> str | None:
            return str(base_dir / value) if value else None

        return cls(
            name,
            host.docker,
            tls_ca=path(host.tls_ca),
            tls_cert=path(host.tls_cert),
            tls_key=path(host.tls_key),
        )

    @classmethod
    def local(cls) -> Engine:
        """The machine's own engine: DOCKER_HOST if set, else the default unix socket."""
        return cls("local", os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, {redact_url(self.url)!r})"

    # -- errors -----------------------------------------------------------------------------

    def _where(self) -> str:
        return f"host {self.name} ({redact_url(self.url)})"

    def _translate(
        self,
        message: str,
        action: str,
        *,
        status: int | None,
        not_found: type[PipelineError] = StallingError,
        stream: bool = False,
        secrets: Sequence[str] = (),
    ) -> PipelineError:
        """The one place deciding an error's kind from an HTTP status and/or Docker's message."""
        for secret in secrets:
            if secret:
                message = message.replace(secret, "***")
        errno = _ERRNO.search(message)
        if status is None and not stream and errno:
            message = errno.group(0)  # requests' wrapping repeats the URL three times
        text = f"{self._where()}: {action}: {redact(message.strip())}"
        low = message.lower()
        if status in (401, 403) or any(m in low for m in _AUTH_MARKERS):
            return RegistryAuthError(text)
        if status == 404 or (stream and any(m in low for m in _NOT_FOUND_MARKERS)):
            return not_found(text)
        if "server gave http response to https client" in low:
            return StallingError(f"{text} (is the registry insecure? trust it in daemon.json)")
        if status is None or status >= 500 or status in (408, 409, 429):
            return EngineError(text)
        return StallingError(text)

    @contextmanager
    def _calling(
        self,
        action: str,
        *,
        not_found: type[PipelineError] = StallingError,
        secrets: Sequence[str] = (),
    ) -> Iterator[None]:
        try:
            yield
        except PipelineError:
            raise
        except docker.errors.TLSParameterError as exc:  # bad tls_* files: a config problem
            raise StallingError(f"{self._where()}: {action}: {exc}") from None
        except docker.errors.APIError as exc:
            message = str(exc.explanation or exc)
            raise self._translate(
                message, action, status=status_of(exc), not_found=not_found, secrets=secrets
            ) from None
        except _OTHER_ERRORS as exc:
            raise self._translate(
                str(exc), action, status=None, not_found=not_found, secrets=secrets
            ) from None

    @property
    def _client(self) -> Any:
        with self._lock:
            if self._docker is None:
                tls: Any = None
                if self._tls_ca or self._tls_cert:
                    cert = (self._tls_cert, self._tls_key) if self._tls_cert else None
                    tls = docker.tls.TLSConfig(
                        client_cert=cert, ca_cert=self._tls_ca, verify=self._tls_ca or True
                    )
                with self._calling("connect"):
                    # requests would let REQUESTS_CA_BUNDLE override the host's tls_ca and
                    # route engine traffic through an HTTP(S)_PROXY from the environment: the
                    # config names the endpoint and its CA, and nothing else may. So the client
                    # is made without a request ("1.24", the oldest API), stops trusting the
                    # environment, and only then negotiates the version as "auto" would.
                    client = docker.DockerClient(
                        base_url=self.url,
                        tls=tls,
                        timeout=int(self._timeout),
                        use_ssh_client=self.url.startswith("ssh://"),
                        version="1.24",
                    )
                    client.api.trust_env = False
                    client.api._version = client.api.version(api_version=False)["ApiVersion"]
                    self._docker = client
            return self._docker

    def close(self) -> None:
        """Close the connection; a later call reconnects."""
        with self._lock:
            if self._docker is not None:
                self._docker.close()
                self._docker = None

    def ping(self) -> None:
        """Raise EngineError unless the engine answers."""
        with self._calling("ping"):
            self._client.ping()

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
        on_output: Callable[[str], None] | None = None,
    ) -> str:
        """Build `context` (dockerfile relative to it), tag it with every tag, return the image id.

        A failing step raises StallingError("build failed: ...") with the last output lines.
        """
        tail: deque[str] = deque(maxlen=_BUILD_TAIL)
        image_id: str | None = None
        with self._calling(f"build {context}"):
            stream = self._client.api.build(
                path=str(context),
                dockerfile=dockerfile,
                tag=tags[0] if tags else None,
                labels=dict(labels),
                buildargs=dict(build_args),
                pull=pull,
                rm=True,
                forcerm=True,
                decode=True,
                timeout=_BUILD_TIMEOUT,
            )
            for chunk in stream:
                if "error" in chunk or "errorDetail" in chunk:
                    detail = chunk.get("errorDetail") or {}
                    message = str(detail.get("message") or chunk.get("error") or "unknown error")
                    output = "\n".join(tail)
                    raise StallingError(
                        f"build failed: {self._where()}: {redact(message)}\n{redact(output)}"
                        .rstrip()
                    )
                text = chunk.get("stream")
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
            raise StallingError(f"build failed: {self._where()}: no image id in the build output")
        if not image_id.startswith("sha256:"):
            image_id = self._inspect_image(image_id)["Id"]
        for extra in tags[1:]:
            repo, _, tag = extra.rpartition(":") if ":" in extra.split("/")[-1] else (extra, "", "")
            self.tag(image_id, repo, tag or "latest")
        log.info("image built", host=self.name, image=image_id, tags=list(tags))
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
        with self._calling(action, secrets=secrets):
            stream = self._client.api.push(
                repository,
                tag=tag,
                stream=True,
                decode=True,
                auth_config=dict(auth) if auth else None,
            )
            for chunk in stream:
                self._raise_stream_error(chunk, action, secrets)
                aux = chunk.get("aux") or {}
                if isinstance(aux, dict) and aux.get("Digest"):
                    digest = str(aux["Digest"])
                if on_output and chunk.get("status") and not chunk.get("progressDetail"):
                    on_output(" ".join(str(chunk[k]) for k in ("id", "status") if chunk.get(k)))
        if digest is None:
            raise EngineError(f"{self._where()}: {action}: the push reported no digest")
        log.info("image pushed", host=self.name, image=f"{repository}:{tag}", digest=digest)
        return digest

    def _raise_stream_error(
        self,
        chunk: Mapping[str, Any],
        action: str,
        secrets: Sequence[str],
        not_found: type[PipelineError] = StallingError,
    ) -> None:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail") or {}
            message = str(detail.get("message") or chunk.get("error") or "unknown error")
            code = detail.get("code") if isinstance(detail.get("code"), int) else None
            raise self._translate(
                message, action, status=code, not_found=not_found, stream=True, secrets=secrets
            )

    def pull(self, ref: str, *, auth: Mapping[str, str] | None) -> str:
        """Pull `ref` (name:tag or name@digest) and return the local image id."""
        action = f"pull {ref}"
        secrets = [auth.get("password", "")] if auth else []
        with self._calling(action, not_found=ImageNotFound, secrets=secrets):
            stream = self._client.api.pull(
                ref, stream=True, decode=True, auth_config=dict(auth) if auth else None
            )
            for chunk in stream:
                self._raise_stream_error(chunk, action, secrets, not_found=ImageNotFound)
            image_id = str(self._client.api.inspect_image(ref)["Id"])
        log.info("image pulled", host=self.name, image=ref)
        return image_id

    def _inspect_image(self, ref: str) -> dict[str, Any]:
        with self._calling(f"inspect image {ref}", not_found=ImageNotFound):
            return dict(self._client.api.inspect_image(ref))

    def has_image(self, ref: str) -> bool:
        """True when the engine holds an image for `ref` (id, tag or repo@digest)."""
        try:
            self._inspect_image(ref)
        except ImageNotFound:
            return False
        return True

    def tag(self, image: str, repository: str, tag: str) -> None:
        """Tag an image (id or ref) as repository:tag."""
        with self._calling(f"tag {image} as {repository}:{tag}", not_found=ImageNotFound):
            self._client.api.tag(image, repository, tag=tag, force=True)

    def remove_image(self, ref: str) -> None:
        """Remove an image or untag a ref; an image in use or already gone is left alone."""
        with self._calling(f"remove image {ref}"):
            try:
                self._client.api.remove_image(ref)
            except docker.errors.APIError as exc:
                # 409: in use by a container or referenced by several repositories; keep it.
                if status_of(exc) not in (404, 409):
                    raise

    def images_labelled(self, label: str, value: str) -> list[tuple[str, int]]:
        """(id, created epoch seconds) of the images carrying label=value, newest first."""
        with self._calling(f"list images {label}={value}"):
            found = self._client.api.images(filters={"label": f"{label}={value}"})
        return sorted(((i["Id"], int(i.get("Created", 0))) for i in found), key=lambda x: -x[1])

    # -- containers -------------------------------------------------------------------------

    def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a container; a managed container of the same name is replaced first.

        Raises StallingError when the name belongs to a container pipeline did not create.
        """
        existing = self.inspect(spec.name)
        if existing is not None and existing.name == spec.name:
            if not existing.managed:
                raise StallingError(
                    f"{self._where()}: container {spec.name!r} exists and was not created by "
                    f"pipeline (no {MANAGED_LABEL} label); refusing to replace it"
                )
            self.remove(existing.id)
        kwargs = create_kwargs(spec)
        action = f"create container {spec.name} from {spec.image}"
        with self._calling(action, not_found=ImageNotFound):
            container = self._client.containers.create(spec.image, **kwargs)
        try:
            with self._calling(f"start container {spec.name}"):
                container.start()
                container.reload()
        except PipelineError:
            # A container that never started holds its name and nothing else worth keeping.
            self._force_remove(container.id)
            raise
        info = container_info(container.attrs)
        log.info("container started", host=self.name, service=spec.labels.get(SERVICE_LABEL),
                 container=info.name, image=spec.image)
        return info

