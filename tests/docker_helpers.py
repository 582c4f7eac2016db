"""Test helpers for the Docker side: busybox build contexts and a real registry process."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import httpx

BUSYBOX = Path("/bin/busybox")
HTTPD_CMD = '["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]'
TEST_LABEL = "dev.pipeline-test.session"  # not under dev.pipeline.: tests' own bookkeeping


def unique_name(prefix: str = "pl-test") -> str:
    """A container/image/network name no other test run uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_busybox_context(
    directory: Path,
    session: str,
    *,
    files: Mapping[str, str] | None = None,
    extra: str = "",
    cmd: str = HTTPD_CMD,
) -> Path:
    """Write a FROM-scratch busybox httpd context serving `files` from /www; return its path.

    Every layer carries the session label (so no cache is shared with other runs), which lets
    `remove_test_images` find even the intermediate images a failed build leaves behind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, directory / "busybox")
    www = directory / "www"
    www.mkdir(exist_ok=True)
    for name, text in (files if files is not None else {"health": "ok\n"}).items():
        (www / name).write_text(text)
    (directory / "Dockerfile").write_text(
        f"FROM scratch\nLABEL {TEST_LABEL}={session}\n"
        "COPY busybox /bin/busybox\nCOPY www/ /www/\n"
        f"{extra}\nCMD {cmd}\n"
    )
    return directory


def remove_test_images(sdk: docker.DockerClient, session: str) -> None:
    """Remove every image (intermediate ones too) that the session's builds made."""
    found = sdk.images.list(all=True, filters={"label": f"{TEST_LABEL}={session}"})
    # Children first: removing an image also prunes its untagged parents.
    for image in sorted(found, key=lambda i: i.attrs.get("Created", ""), reverse=True):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            sdk.images.remove(image.id, force=True)


def make_htpasswd(path: Path, user: str, password: str) -> str | None:
    """Write a bcrypt htpasswd file; return None when done, else why it could not be made.

    The cost is the minimum (4): the registry checks the hash on every request of a push."""
    hashed: str | None = None
    try:
        import bcrypt

        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    except ImportError:
        if shutil.which("htpasswd"):
            out = subprocess.run(
                ["htpasswd", "-nbB", "-C", "4", "--", user, password],
                check=True, capture_output=True, text=True,
            ).stdout
            hashed = out.strip().split(":", 1)[1]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    import crypt  # libxcrypt does bcrypt ($2b$), which the registry accepts
                except ImportError:
                    return "neither python bcrypt, htpasswd nor crypt is available"
            if not hasattr(crypt, "METHOD_BLOWFISH"):
                return "neither python bcrypt, htpasswd nor crypt with bcrypt is available"
            hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))  # noqa: S324
    path.write_text(f"{user}:{hashed}\n")
    return None


@dataclass(frozen=True)
class Registry:
    """A running registry: `address` is HOST:PORT as used in image refs."""

    address: str

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@contextlib.contextmanager
def run_registry(directory: Path, *, htpasswd: Path | None = None) -> Iterator[Registry]:
    """Run `docker-registry serve` on 127.0.0.1:<free port> with storage under `directory`."""
    if shutil.which("docker-registry") is None:
        raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = (
        f"auth:\n  htpasswd:\n    realm: pipeline-test\n    path: {htpasswd}\n" if htpasswd else ""
    )
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage:\n  filesystem: {{rootdirectory: {directory / 'data'}}}\n"
        "  delete: {enabled: true}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n" + auth
    )
    log = (directory / "registry.log").open("wb")
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    registry = Registry(f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"registry exited: {(directory / 'registry.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{registry.url}/v2/", timeout=1, trust_env=False).status_code in (
                    200,
                    401,
                ):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("registry did not answer within 15 s")
            time.sleep(0.05)
        yield registry
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
