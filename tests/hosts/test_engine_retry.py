"""Which docker and requests errors an engine retries, as a table: the engine gets a stand-in
docker client that fails as the daemon does, and a retry policy that never sleeps."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import docker.errors
import pytest
import requests
import requests.exceptions

from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.connection import Connection
from pipeline.hosts.engine import Engine, EngineError, ImageNotFound, RegistryAuthError
from pipeline.retry import RetryPolicy

REF = "10.88.0.1:5000/web@sha256:" + "a" * 64
REGISTRY_GET = 'Get "https://10.88.0.1:5000/v2/"'


def api_error(status: int, explanation: str) -> docker.errors.APIError:
    """An APIError as the SDK raises it for an HTTP answer of the daemon."""
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError(
        f"{status} Server Error", response=response, explanation=explanation
    )


def stream_error(message: str) -> dict[str, Any]:
    """A pull stream's error chunk (the daemon answered 200, then failed midway)."""
    return {"errorDetail": {"message": message}, "error": message}


@dataclass
class FakeApi:
    """The low-level API of a docker client whose pulls fail with `failures`, then succeed."""

    failures: list[BaseException | dict[str, Any]]
    pulls: int = 0
    inspects: int = 0
    inspect_failures: list[BaseException] = field(default_factory=list)

    def pull(self, ref: str, **_kw: Any) -> Iterator[dict[str, Any]]:
        self.pulls += 1
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, BaseException):
                raise failure
            return iter([{"status": "Pulling fs layer"}, failure])
        return iter([{"status": "Downloaded newer image"}])

    def inspect_image(self, ref: str) -> dict[str, Any]:
        self.inspects += 1
        if self.inspect_failures:
            raise self.inspect_failures.pop(0)
        return {"Id": "sha256:" + "b" * 64, "RepoDigests": [REF]}


@dataclass
class FakeClient:
    api: FakeApi

    def close(self) -> None:
        pass


@dataclass
class Sleeps:
    """An injected sleep that records how long it was asked to wait and returns at once."""

    waits: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def engine_failing(*failures: BaseException | dict[str, Any]) -> tuple[Engine, FakeApi, Sleeps]:
    sleeps = Sleeps()
    api = FakeApi(list(failures))
    engine = Engine(
        Connection("lab-2", "tcp://10.88.0.3:2375", client=FakeClient(api)),
        retry=RetryPolicy(sleep=sleeps),
    )
    return engine, api, sleeps


TRANSIENT = {
    "the daemon cannot reach the registry (its 500, as seen in the lab)": api_error(
        500, f"{REGISTRY_GET}: dial tcp 10.88.0.1:5000: connect: connection refused"
    ),
    "the registry does not answer in time (a dropped packet)": api_error(
        500,
        f"{REGISTRY_GET}: context deadline exceeded (Client.Timeout exceeded while awaiting "
        "headers)",
    ),
    "TLS handshake timeout": api_error(500, f"{REGISTRY_GET}: net/http: TLS handshake timeout"),
    "the registry answers 503": api_error(
        500, "received unexpected HTTP status: 503 Service Unavailable"
    ),
    "the engine answers 502": api_error(502, "Bad Gateway"),
    "too many requests": api_error(429, "toomanyrequests: rate limit exceeded"),
    "engine connection refused": requests.exceptions.ConnectionError(
        "HTTPConnectionPool(host='10.88.0.3', port=2375): Max retries exceeded "
        "(Caused by NewConnectionError('[Errno 111] Connection refused'))"
    ),
    "engine connection reset": requests.exceptions.ConnectionError(
        "('Connection aborted.', ConnectionResetError(104, 'Connection reset by peer'))"
    ),
    "engine read timeout": requests.exceptions.ReadTimeout(
        "HTTPConnectionPool(host='10.88.0.3', port=2375): Read timed out. (read timeout=60)"
    ),
    "a layer download reset midway (stream error)": stream_error(
        "read tcp 10.88.0.3:40312->10.88.0.1:5000: read: connection reset by peer"
    ),
}

NOT_RETRIED: dict[str, tuple[BaseException | dict[str, Any], type[PipelineError]]] = {
    "registry refuses the credentials (401)": (
        api_error(401, "unauthorized: authentication required"),
        RegistryAuthError,
    ),
    "registry refusal wrapped in a 500 by the daemon": (
        api_error(500, f"{REGISTRY_GET}: unauthorized: authentication required"),
        RegistryAuthError,
    ),
    "access denied (403)": (
        api_error(403, "denied: requested access to the resource is denied"),
        RegistryAuthError,
    ),
    "manifest unknown (404)": (
        api_error(404, f"manifest for {REF} not found: manifest unknown: manifest unknown"),
        ImageNotFound,
    ),
    "manifest unknown (stream error)": (stream_error("manifest unknown"), ImageNotFound),
    "registry certificate not trusted": (
        api_error(500, f"{REGISTRY_GET}: x509: certificate signed by unknown authority"),
        StallingError,
    ),
    "a bad request (400)": (api_error(400, "invalid reference format"), StallingError),
}


@pytest.mark.parametrize("failure", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_pull_failures_are_retried_with_capped_backoff(
    failure: BaseException | dict[str, Any],
) -> None:
    """A transient failure is retried up to 5 tries, waiting 0.5, 1, 2, 4 s, and is raised as
    a TransientError (EngineError) naming the host once the tries are used up."""
    engine, api, sleeps = engine_failing(*[failure] * 5)
    with pytest.raises(EngineError, match=r"^host lab-2 \(tcp://10.88.0.3:2375\): pull ") as caught:
        engine.pull(REF, auth=None)
    assert caught.value.retry and caught.value.failure_kind == "infrastructure"
    assert api.pulls == 5
    assert sleeps.waits == [0.5, 1, 2, 4]


@pytest.mark.parametrize("failure", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_a_blip_shorter_than_the_retries_is_covered(
    failure: BaseException | dict[str, Any],
) -> None:
    """A pull that fails twice transiently and then succeeds returns the image id."""
    engine, api, sleeps = engine_failing(failure, failure)
    assert engine.pull(REF, auth=None) == "sha256:" + "b" * 64
    assert api.pulls == 3 and sleeps.waits == [0.5, 1]


@pytest.mark.parametrize(
    ("failure", "kind"), NOT_RETRIED.values(), ids=NOT_RETRIED.keys()
)
def test_refusals_and_unknown_images_are_not_retried(
    failure: BaseException | dict[str, Any], kind: type[PipelineError]
) -> None:
    """Auth refusals, unknown manifests, an untrusted certificate and bad requests fail at the
    first try, as stalling errors, without waiting."""
    engine, api, sleeps = engine_failing(failure)
    with pytest.raises(kind) as caught:
        engine.pull(REF, auth=None)
    assert not caught.value.retry
    assert api.pulls == 1 and sleeps.waits == []


def test_image_inspection_is_retried_and_a_missing_image_is_an_answer() -> None:
    """`has_image` retries an engine that does not answer, and a 404 means False at once."""
    engine, api, sleeps = engine_failing()
    api.inspect_failures = [requests.exceptions.ConnectionError("[Errno 111] Connection refused")]
    assert engine.has_image(REF)
    assert api.inspects == 2 and sleeps.waits == [0.5]
    api.inspect_failures = [api_error(404, f"No such image: {REF}")]
    assert not engine.has_image(REF)
    assert api.inspects == 3 and sleeps.waits == [0.5]
