"""`pipeline init [DIR]`: a commented `pipeline.toml` for a repository, made from its Dockerfiles.

One `[images.*]` per Dockerfile (context and dockerfile filled), one `[services.*]` per image
with the port of its first `EXPOSE` (parsed by dockerfile-parse), a health table to adjust, and
`[hosts.*]`/`[registry]` placeholders that `pipeline validate` refuses until they are filled."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import click

from pipeline.cli.common import EXIT_USAGE, argument, command, fail

FILL = "FILL-IN"  # what every placeholder holds; `validate` refuses it at its key (config.load)
_SKIP_DIRS = {".git", "node_modules", ".venv", "venv", "__pycache__", ".pipeline"}
_DOCKERFILE = re.compile(r"^(Dockerfile|Containerfile)(\..+)?$|^.+\.(Dockerfile|Containerfile)$")


def find_dockerfiles(root: Path) -> list[PurePosixPath]:
    """Dockerfiles under `root` (Dockerfile, Dockerfile.*, *.Dockerfile, Containerfile), as
    paths relative to it, in path order; VCS, virtualenv and dependency folders skipped."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if path.is_file() and _DOCKERFILE.match(path.name):
            found.append(PurePosixPath(rel.as_posix()))
    return found


def exposed_port(text: str) -> int | None:
    """The first port a Dockerfile's EXPOSE names (8080 of "EXPOSE 8080/tcp 9090"), or None;
    parsed by dockerfile-parse, so line continuations and comments are Docker's."""
    import io

    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(text.encode("utf-8")))
    for instruction in parser.structure:
        if instruction["instruction"] == "EXPOSE":
            for word in instruction["value"].split():
                port = word.split("/")[0]
                if port.isdigit():
                    return int(port)
    return None


def _name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name or "app"


def image_name(dockerfile: PurePosixPath, repo: str) -> str:
    """The image name for a Dockerfile: its folder's name (the repo's at the root), plus the
    suffix of Dockerfile.SUFFIX / SUFFIX.Dockerfile."""
    base = _name(dockerfile.parent.name) if dockerfile.parent.name else _name(repo)
    stem = dockerfile.name
    extra = stem.split(".", 1)[1] if stem.startswith(("Dockerfile.", "Containerfile.")) else ""
    if stem.endswith((".Dockerfile", ".Containerfile")):
        extra = stem.rsplit(".", 1)[0]
    return f"{base}-{_name(extra)}" if extra else base


def init_toml(repo: str, url: str, dockerfiles: Iterable[tuple[PurePosixPath, str]]) -> str:
    """The commented config for repository `repo` at `url` with these (path, text) Dockerfiles."""
    out = [
        "# pipeline.toml, written by `pipeline init`. Fill in every FILL-IN, then run",
        "# `pipeline validate`; README.md describes every key.",
        "",
        "[pipeline]",
        'data_dir = ".pipeline"              # state database and git mirrors',
        "",
        "[registry]                          # where images are pushed and hosts pull from",
        f'address = "{FILL}"                 # host:port, e.g. registry.example.com:5000',
        '# username = "deploy"',
        '# password_env = "REGISTRY_PASSWORD"',
        "",
        "[hosts.host-1]                      # one table per Docker host",
        f'docker = "{FILL}"                  # tcp://ADDRESS:2376 (with tls_*) or ssh://user@ADDRESS',
        '# address = "ADDRESS"             # where published ports are reached, if not the URL\'s',
        "",
        f"[repos.{repo}]",
        f'url = "{url}"',
        'branch = "main"',
        'poll = "1m"                         # or a webhook: webhook_secret_env = "…"',
        "",
    ]
    images: list[tuple[str, int | None]] = []
    used: set[str] = set()
    for path, text in dockerfiles:
        name = image_name(path, repo)
        while name in used:
            name += "-2"
        used.add(name)
        context = path.parent.as_posix() or "."
        out += [f"[images.{name}]", f'repo = "{repo}"', f'context = "{context}"']
        if path.name != "Dockerfile" or context == ".":
            out.append(f'dockerfile = "{path.as_posix()}"')
        out.append("")
        images.append((name, exposed_port(text)))
    host_ports: set[int] = set()
    for name, port in images:
        out += [f"[services.{name}]", f'image = "{name}"', 'hosts = ["host-1"]']
        if port is not None:
            published = port
            while published in host_ports:
                published += 1
            host_ports.add(published)
            out.append(f'ports = ["{published}:{port}"]       # host:container (EXPOSE {port})')
        else:
            out.append('# ports = ["8080:8080"]           # its Dockerfile EXPOSEs no port')
        out += [
            '# env = { KEY = "value" }',
            '# env_file = "deploy/NAME.env"',
            "",
            f"[services.{name}.health]           # the check a new container must pass",
        ]
        if port is not None:
            out.append('http = "/"                          # a path answering 2xx/3xx when ready')
        else:
            out.append('# http = "/health"                # or tcp = PORT, or cmd = [...]')
        out += ['interval = "1s"', 'timeout = "30s"', ""]
    if not images:
        out += ["# No Dockerfile found: add [images.NAME] and [services.NAME] tables.", ""]
    return "\n".join(out)


@command("init")
@argument(
    "directory",
    type=click.Path(path_type=Path),
    default=Path("."),
    required=False,
    help="The repository (default: here).",
)
def init(directory: Path) -> None:
    """Write a commented pipeline.toml for the repository in DIRECTORY, from its
    Dockerfiles; refuse to overwrite one."""
    root = directory.resolve()
    target = root / "pipeline.toml"
    if not root.is_dir():
        fail(f"{directory}: not a directory", EXIT_USAGE)
    if target.exists():
        fail(f"{target}: exists; not overwritten", EXIT_USAGE)
    files = find_dockerfiles(root)
    text = init_toml(
        _name(root.name),
        str(root),
        ((p, (root / p).read_text(encoding="utf-8", errors="replace")) for p in files),
    )
    target.write_text(text, encoding="utf-8")
    click.echo(f"wrote {target}: {len(files)} image(s) and service(s); fill in every {FILL}, "
               "then run `pipeline validate`")  # fmt: skip
