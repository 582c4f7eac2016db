"""The connection to one Docker engine: the docker SDK client, made on first use, and the one place
where docker/requests exceptions become pipeline's error kinds.

Every message names the engine (`host lab-1 (tcp://10.88.0.2:2375): ...`) and never a credential.
`Engine` (images) and `Containers` (containers) both call the engine through one `Connection`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import docker
import docker.errors
import docker.tls
import requests.exceptions

from pipeline.errors import PipelineError, StallingError, TransientError
from pipeline.hosts.sshpool import pooled_ssh
from pipeline.redact import redact, redact_url

_AUTH_MARKERS = ("unauthorized", "authentication required", "no basic auth credentials", "denied:")
_NOT_FOUND_MARKERS = ("manifest unknown", "not found", "no such image")
# The engine does not trust the registry's certificate: retrying cannot help ("TLS handshake
# timeout", by contrast, is a network blip and stays transient).
_TRUST_MARKERS = ("x509:", "certificate signed by unknown authority")
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")
_OTHER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class EngineError(TransientError):
    """The engine could not be reached or failed (connection refused, 5xx); retried."""


class RegistryAuthError(StallingError):
    """The registry refused the credentials (401/403); retrying cannot help."""


class ImageNotFound(StallingError):
    """The image (usually a digest) does not exist in the registry or on the engine."""


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of a docker SDK APIError, None for errors without a response."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def stream_error(chunk: Mapping[str, Any]) -> tuple[str, int | None] | None:
    """(message, HTTP-like code or None) when a chunk of a build, push or pull stream reports
    an error, else None."""
    if "error" not in chunk and "errorDetail" not in chunk:
        return None
    detail = chunk.get("errorDetail") or {}
    message = str(detail.get("message") or chunk.get("error") or "unknown error")
    return message, detail.get("code") if isinstance(detail.get("code"), int) else None


class Connection:
    """A docker SDK client for the engine at `url` (named `name` in messages), connected on first
    use of `client`; TLS files are paths, `timeout` is seconds per API call."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        timeout: float = 60,
        client: Any = None,
    ) -> None:
        self.name = name
        self.url = url
        self._tls_ca, self._tls_cert, self._tls_key = tls_ca, tls_cert, tls_key
        self._timeout = timeout
        self._lock = threading.Lock()
        self._docker: Any = client  # a docker.DockerClient; None: connect on first use

    @property
    def where(self) -> str:
        """The engine as messages name it: "host NAME (URL)", credentials masked."""
        return f"host {self.name} ({redact_url(self.url)})"

    @property
    def client(self) -> Any:
        """The `docker.DockerClient`, connected now if it is not yet (errors as `calling`)."""
        with self._lock:
            if self._docker is None:
                tls: Any = None
                if self._tls_ca or self._tls_cert:
                    cert = (self._tls_cert, self._tls_key) if self._tls_cert else None
                    tls = docker.tls.TLSConfig(
                        client_cert=cert, ca_cert=self._tls_ca, verify=self._tls_ca or True
                    )
                with self.calling("connect"):
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
                    pooled_ssh(client.api)  # ssh://: reuse ssh connections across calls
                    client.api._version = client.api.version(api_version=False)["ApiVersion"]
                    self._docker = client
            return self._docker

    def cli_flags(self) -> list[str]:
        """The docker CLI's global flags reaching this engine as the SDK client does (its URL
        and TLS files); `pipeline.hosts.dockercli.engine_flags`."""
        from pipeline.hosts.dockercli import engine_flags

        return engine_flags(
            self.url, tls_ca=self._tls_ca, tls_cert=self._tls_cert, tls_key=self._tls_key
        )

    def close(self) -> None:
        """Close the client and its pooled connections (on ssh://, their ssh processes end); a
        later use of `client` reconnects."""
        with self._lock:
            if self._docker is not None:
                self._docker.close()
                self._docker = None

    @contextmanager
    def calling(
        self,
        action: str,
        *,
        not_found: type[PipelineError] = StallingError,
        secrets: Sequence[str] = (),
    ) -> Iterator[None]:
        """Turn a docker/requests exception raised in the block into a pipeline error whose
        message is "WHERE: ACTION: what Docker said"; `not_found` is raised for a 404, and
        `secrets` (e.g. a registry password) are masked in the message."""
        try:
            yield
        except PipelineError:
            raise
        except docker.errors.TLSParameterError as exc:  # bad tls_* files: a config problem
            raise StallingError(f"{self.where}: {action}: {exc}") from None
        except docker.errors.APIError as exc:
            message = str(exc.explanation or exc)
            raise self._translate(
                message, action, status=status_of(exc), not_found=not_found, secrets=secrets
            ) from None
        except _OTHER_ERRORS as exc:
            raise self._translate(
                str(exc), action, status=None, not_found=not_found, secrets=secrets
            ) from None

    def raise_stream_error(
        self,
        chunk: Mapping[str, Any],
        action: str,
        secrets: Sequence[str],
        not_found: type[PipelineError] = StallingError,
    ) -> None:
        """Raise the pipeline error for a chunk of a push or pull stream that reports one."""
        reported = stream_error(chunk)
        if reported is not None:
            message, code = reported
            raise self._translate(
                message, action, status=code, not_found=not_found, stream=True, secrets=secrets
            )

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
        text = f"{self.where}: {action}: {redact(message.strip())}"
        low = message.lower()
        if status in (401, 403) or any(m in low for m in _AUTH_MARKERS):
            return RegistryAuthError(text)
        if status == 404 or (stream and any(m in low for m in _NOT_FOUND_MARKERS)):
            return not_found(text)
        if "server gave http response to https client" in low:
            return StallingError(f"{text} (is the registry insecure? trust it in daemon.json)")
        if any(m in low for m in _TRUST_MARKERS):
            return StallingError(f"{text} (the engine does not trust the registry's certificate)")
        if status is None or status >= 500 or status in (408, 409, 429):
            return EngineError(text)
        return StallingError(text)
