"""The lab's proxy image: Debian's `caddy` package made into an image that behaves like the
official `caddy:2` (`/usr/bin/caddy`, its CMD), pushed to the lab registry, since Docker Hub
cannot be reached here (TESTBED.md, "A reverse proxy").

The Debian binary is linked dynamically (libc, libzstd), so the image, `FROM scratch`, carries
the libraries `ldd` names and the loader at the paths the binary asks for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker
import structlog

from pipeline.lab.registry import LabError

log = structlog.get_logger(__name__)

CADDY_BINARY = Path("/usr/bin/caddy")
REPOSITORY = "pipeline-caddy"
DOCKERFILE = """\
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/bin:/bin XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data
EXPOSE 80 443 2019
CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
"""
CADDYFILE = ':80 {\n\trespond "Caddy works\\n"\n}\n'


def shared_libraries(binary: Path) -> list[Path]:
    """The absolute paths of the libraries and loader `ldd` lists for `binary` (none for a
    static one). Raises LabError when ldd fails."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if "not a dynamic executable" in done.stdout + done.stderr:
            return []
        raise LabError(f"ldd {binary}: {done.stderr.strip() or done.stdout.strip()}")
    return [Path(p) for p in re.findall(r"(/\S+)\s+\(0x", done.stdout)]


def caddy_version(binary: Path = CADDY_BINARY) -> str:
    """The version of the caddy binary ("2.6.2"). Raises LabError when it does not run."""
    done = subprocess.run([str(binary), "version"], capture_output=True, text=True, check=False)
    match = re.search(r"v?(\d+\.\d+\.\d+)", done.stdout)
    if done.returncode != 0 or match is None:
        raise LabError(f"{binary} version: {done.stderr.strip() or done.stdout.strip()}")
    return match.group(1)


def write_context(ctx: Path, binary: Path = CADDY_BINARY) -> None:
    """The build context: the Dockerfile and a root file system with the binary, its libraries
    and loader, /etc/caddy/Caddyfile and the empty /config, /data and /tmp it writes to."""
    root = ctx / "rootfs"
    for path in [binary, *shared_libraries(binary)]:
        dest = root / path.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), dest)  # the file, not the symlink the loader path is
    for folder in ("config", "data", "tmp", "etc/caddy"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / ".keep").write_text("")
    (root / "etc" / "caddy" / "Caddyfile").write_text(CADDYFILE)
    (ctx / "Dockerfile").write_text(DOCKERFILE)


def build_and_push(registry: str, docker_url: str = "unix:///var/run/docker.sock") -> str:
    """Build the image on the engine at `docker_url`, push it to `registry` (which that engine
    trusts) and return its reference ("REGISTRY/pipeline-caddy:2.6.2"). Raises LabError when
    caddy is not installed or the build or push fails."""
    if not CADDY_BINARY.is_file():
        raise LabError(f"{CADDY_BINARY} is missing: apt-get install caddy")
    ref = f"{registry}/{REPOSITORY}:{caddy_version()}"
    client = docker.DockerClient(base_url=docker_url, timeout=300)
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-caddy-") as tmp:
            write_context(Path(tmp))
            client.images.build(path=tmp, tag=ref, rm=True, forcerm=True)
        repository, tag = ref.rsplit(":", 1)
        for chunk in client.api.push(repository, tag=tag, stream=True, decode=True):
            if "error" in chunk:
                raise LabError(f"push {ref}: {chunk['error']}")
    except docker.errors.DockerException as exc:
        raise LabError(f"building the lab's proxy image {ref}: {exc}") from None
    finally:
        client.close()
    log.info("lab.proxy_image", image=ref)
    return ref
