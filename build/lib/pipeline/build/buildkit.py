"""Which builder an image builds with, and the docker CLI arguments of a BuildKit build: pure.

The choice (`choose_builder`) takes what the candidate CLIs offer (probed by
`pipeline.hosts.dockercli.probe`) and the image's `builder` setting; the argv (`cli_build_args`)
is data the engine runs (`Engine.build_cli`). Docker's rules followed: `docker buildx build`
when the buildx plugin is there (Docker docs, "docker buildx build"); else, with a CLI before
23.0, `DOCKER_BUILDKIT=1 docker build` (Docker docs, "BuildKit: getting started": "set the
DOCKER_BUILDKIT=1 environment variable when invoking the docker build command"); else the
engine's legacy builder through the SDK.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dockerfile_parse import DockerfileParser

from pipeline.hosts.dockercli import CliProbe
from pipeline.plan.buildkeys import SecretSource, cache_from_image, inline_cache_to

FALLBACK_CLI = "/usr/bin/docker"  # where Debian's docker.io (20.10, BuildKit inside) installs it


@dataclass(frozen=True)
class BuilderChoice:
    """How an image builds: `kind` "buildx" (`docker buildx build`), "buildkit"
    (`DOCKER_BUILDKIT=1 docker build`) or "legacy" (the SDK); `cli` the CLI's path (None for
    legacy); `why` says why it is legacy (or, for the others, "")."""

    kind: Literal["buildx", "buildkit", "legacy"]
    cli: str | None = None
    why: str = ""

    @property
    def notice(self) -> str:
        """The one line a user sees: "BuildKit: /usr/bin/docker build" or "legacy builder: ..."."""
        if self.kind == "legacy":
            return f"legacy builder: {self.why}"
        how = "buildx build" if self.kind == "buildx" else "build (DOCKER_BUILDKIT=1)"
        return f"BuildKit: {self.cli} {how}"


def cli_candidates(configured: str | None, on_path: str | None) -> list[str]:
    """The CLIs tried, in order and without repeats: `[pipeline] docker_cli`, `docker` on PATH,
    then /usr/bin/docker (another CLI earlier on PATH may lack BuildKit)."""
    out: list[str] = []
    for path in (configured, on_path, FALLBACK_CLI):
        if path and path not in out:
            out.append(path)
    return out


def _lacks(probe: CliProbe) -> str:
    if not probe.found:
        return f"{probe.path} not found"
    return f"{probe.path} has no buildx and its build has no BuildKit"


def choose_builder(
    setting: Literal["auto", "buildkit", "legacy"], probes: Sequence[CliProbe]
) -> BuilderChoice:
    """The builder for an image whose `builder` key is `setting`, given the candidate CLIs'
    probes in order: the first CLI with buildx or BuildKit, else legacy with the reason. For
    `setting == "buildkit"` a legacy answer means the image cannot build (the caller says so)."""
    if setting == "legacy":
        return BuilderChoice("legacy", why='builder = "legacy"')
    for probe in probes:
        if probe.buildx:
            return BuilderChoice("buildx", probe.path)
        if probe.buildkit:
            return BuilderChoice("buildkit", probe.path)
    return BuilderChoice("legacy", why="; ".join(_lacks(p) for p in probes) or "no docker CLI")


@dataclass(frozen=True)
class CliBuild:
    """One BuildKit build: the context directory, the Dockerfile (relative to it), the tags,
    labels, build args, stage, secrets, cache specs, whether to pull the base, and the file the
    CLI writes the image id to."""

    context: Path
    dockerfile: str
    tags: Sequence[str]
    labels: Mapping[str, str]
    build_args: Mapping[str, str]
    iidfile: Path
    target: str | None = None
    secrets: Sequence[SecretSource] = ()
    cache_from: Sequence[str] = ()
    cache_to: Sequence[str] = ()
    pull: bool = False


def cli_build_args(
    kind: Literal["buildx", "buildkit"], b: CliBuild
) -> tuple[list[str], dict[str, str]]:
    """(args after the CLI's global flags, environment to add) for a BuildKit build.

    Secrets are passed by reference (`--secret id=ID,env=VAR` / `id=ID,src=PATH`, Docker docs
    "Build secrets"), so their values are never in the argv. Labels are `--label` (BuildKit sets
    them on the image config without a step). On "buildkit" (no buildx), a registry cache spec
    becomes its image (`--cache-from IMAGE`) and `type=inline` the BUILDKIT_INLINE_CACHE=1 build
    arg; other specs are refused before (`pipeline.plan.buildkeys.unsupported_keys`)."""
    args = ["buildx", "build", "--load"] if kind == "buildx" else ["build"]
    args += ["--progress=plain", "--iidfile", str(b.iidfile), "-f", str(b.context / b.dockerfile)]
    for tag in b.tags:
        args += ["-t", tag]
    for key, value in sorted(b.labels.items()):
        args += ["--label", f"{key}={value}"]
    build_args = dict(b.build_args)
    if b.target:
        args += ["--target", b.target]
    if b.pull:
        args.append("--pull")
    for secret in b.secrets:
        where = "env" if secret.kind == "env" else "src"
        args += ["--secret", f"id={secret.id},{where}={secret.source}"]
    for spec in b.cache_from:
        args += ["--cache-from", spec if kind == "buildx" else (cache_from_image(spec) or spec)]
    for spec in b.cache_to:
        if kind == "buildx":
            args += ["--cache-to", spec]
        elif inline_cache_to(spec):
            build_args["BUILDKIT_INLINE_CACHE"] = "1"
    for key, value in sorted(build_args.items()):
        args += ["--build-arg", f"{key}={value}"]
    args.append(str(b.context))
    return args, ({} if kind == "buildx" else {"DOCKER_BUILDKIT": "1"})


def base_images(dockerfile: str, build_args: Mapping[str, str]) -> list[str]:
    """The registry images a Dockerfile's stages start from (`FROM` after ARG substitution with
    `build_args`), in order, without duplicates, stage names and `scratch`.

    The engine pulls these before a BuildKit build that refreshes its bases: dockerd's embedded
    BuildKit resolves a `--pull` through a resolver of its own that does not read the engine's
    `/etc/docker/certs.d` (moby/moby#38303), while an engine pull does; after that pull the
    build finds the fresh base locally. Parsing is dockerfile-parse's (containerbuildsystem)."""
    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile.encode()), build_args=dict(build_args))
    stages = {
        words[2].lower()
        for item in parser.structure
        if item["instruction"] == "FROM"
        and len(words := item["value"].split()) >= 3
        and words[1].lower() == "as"
    }
    images: list[str] = []
    for ref in parser.parent_images:
        if ref.lower() in stages or ref.lower() == "scratch" or ref in images:
            continue
        images.append(ref)
    return images
