"""Building an image at a commit and pushing it; a pushed image is addressed by its digest.

With a `[registry]`, the build engine (local by default) builds once and pushes; hosts pull by
digest. Without one, each target host's own engine builds the image and runs it by local tag.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import structlog

from pipeline.build.buildkit import (
    BuilderChoice,
    CliBuild,
    base_images,
    choose_builder,
    cli_build_args,
    cli_candidates,
)
from pipeline.config.load import LoadedConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.hosts import dockercli
from pipeline.hosts.engine import Engine
from pipeline.plan.buildkeys import SecretSource, secret_sources, unsupported_keys
from pipeline.plan.planner import Build, image_spec_hash
from pipeline.redact import redact, register_secret
from pipeline.retry import RetryPolicy
from pipeline.sources.git import Mirror, Revision
from pipeline.state.steps import StepLog
from pipeline.state.store import State

log = structlog.get_logger(__name__)

_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Artifact:
    """A built image: `ref` is what hosts run (registry@digest, or a tag local to each host)."""

    image: str
    revision: str
    digest: str
    ref: str
    unchanged: bool = False  # rebuilt to the digest it already had


def docker_tag(text: str) -> str:
    """A valid docker tag from a branch or version name (`feature/x` → `feature-x`)."""
    return _TAG_UNSAFE.sub("-", text).lstrip(".-")[:128] or "latest"


class BuildConnections(Protocol):
    """What the builder reaches through (`pipeline.deploy.connections.Connections`, which lives
    above build/): engines by host (None: the local one), mirrors by repo, registry credentials."""

    def engine(self, host: str | None) -> Engine: ...
    def mirror(self, repo: str) -> Mirror: ...
    def registry_auth(self) -> dict[str, str] | None: ...


class Builder:
    """Builds and pushes images; engines, mirrors, the retry policy of pushes and the probe of
    the machine's docker CLIs (`pipeline.hosts.dockercli.probe`) are injected."""

    def __init__(
        self,
        loaded: LoadedConfig,
        state: State,
        connections: BuildConnections,
        *,
        report: Callable[[str], None],
        retry: RetryPolicy | None = None,
        probe: Callable[[str], dockercli.CliProbe] | None = None,
        which: Callable[[str], str | None] = dockercli.which,
    ) -> None:
        self.loaded, self.cfg, self.state = loaded, loaded.model, state
        self.connections, self.report = connections, report
        self.retry = retry or RetryPolicy()
        # What the machine's CLIs offer; probed answers are kept in the data dir, so that a
        # `pipeline run` does not pay the probe (four CLI starts) each time.
        self._probe = probe or partial(
            dockercli.probe, cache_file=loaded.data_dir / "docker-cli-probes.json"
        )
        self._which = which
        self._choices: dict[str, BuilderChoice] = {}
        self._choices_lock = threading.Lock()

    # -- which builder, and can it build what the config asks -------------------------------
    def choice(self, image: str) -> BuilderChoice:
        """How `image` builds (its `builder` key and the CLIs this machine has, probed once)."""
        setting = self.cfg.images[image].builder
        with self._choices_lock:
            if setting not in self._choices:
                paths = cli_candidates(self.cfg.pipeline.docker_cli, self._which("docker"))
                probes = [self._probe(path) for path in paths] if setting != "legacy" else []
                self._choices[setting] = choose_builder(setting, probes)
            return self._choices[setting]

    def check(self, builds: list[Build] | tuple[Build, ...]) -> None:
        """Raise ConfigError, each problem located (`pipeline.toml:LINE: images.NAME.KEY: ...`),
        when a planned build asks for what its builder cannot do or names a secret that is not
        there (an unset variable, an unreadable file); nothing is built then. The secrets'
        values are registered for redaction. A `[pipeline] docker_cli` that cannot run is a
        problem as soon as anything is to be built."""
        problems: list[str] = self.loaded.docker_cli_problems() if builds else []
        for b in builds:
            image = self.cfg.images[b.image]
            choice = self.choice(b.image)
            where = ("images", b.image)
            if image.builder == "buildkit" and choice.kind == "legacy":
                problems.append(
                    f'{self._at(*where, "builder")}: "buildkit" but no docker '
                    f"CLI here builds with BuildKit ({choice.why}); set [pipeline] docker_cli"
                )
            else:
                for key, message in unsupported_keys(image, choice.kind, choice.why):
                    problems.append(f"{self._at(*where, key)}: {message}")
            for secret in secret_sources(image):
                missing = self._read_secret(secret)
                if missing:
                    at = self._at(*where, "secrets", secret.key)
                    problems.append(f"{at}: {missing}; nothing was built")
        if problems:
            raise ConfigError(problems)

    def _pull_bases(self, engine: Engine, dockerfile: Path, build_args: Mapping[str, str]) -> None:
        """Pull the Dockerfile's base images through `engine` (see `buildkit.base_images`), with
        the `[registry]` credentials for images of that registry; PipelineError when one fails."""
        reg = self.cfg.registry
        for ref in base_images(dockerfile.read_text(encoding="utf-8"), build_args):
            ours = reg is not None and ref.startswith(f"{reg.address}/")
            engine.pull(ref, auth=self.connections.registry_auth() if ours else None)

    def _at(self, *key: str) -> str:
        """`pipeline.toml:LINE: a.b.c`, the location load errors give a key."""
        return f"{self.loaded.locate(*key)}: {'.'.join(key)}"

    def _secret_path(self, secret: SecretSource) -> Path:
        return self.loaded.base_dir / secret.source  # an absolute source stays itself

    def _read_secret(self, secret: SecretSource) -> str | None:
        """Register the secret's value for redaction; say what is missing (None: present)."""
        if secret.kind == "env":
            value = os.environ.get(secret.source)
            if not value:
                return f"environment variable {secret.source} is not set"
            register_secret(value)
            return None
        path = self._secret_path(secret)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror or exc}"
        register_secret(text.strip())
        for line in text.splitlines():  # a key file's lines, should one be printed alone
            if len(line.strip()) >= 8 and not line.startswith("-----"):
                register_secret(line.strip())
        return None

    def build(self, b: Build, rev: Revision, run_id: int | None, *, pull: bool = False) -> Artifact:
        """Build `b.image` at `rev`, push it when there is a registry, record the build."""
        image = self.cfg.images[b.image]
        blog = log.bind(image=b.image, revision=rev.sha[:12], repo=b.repo)
        self.report(f"{b.image}: building {rev.sha[:12]} ({b.reason})")
        mirror = self.connections.mirror(b.repo)
        workdir = Path(tempfile.mkdtemp(prefix=f"pipeline-build-{b.image}-"))
        try:
            context, dockerfile = self._export(b, rev, workdir)
            labels = {
                "org.opencontainers.image.revision": rev.sha,
                "org.opencontainers.image.source": redact(self.cfg.repos[b.repo].url),
                # The commit's time, not the build's: an unchanged input then rebuilds to the
                # same digest, so a scheduled rebuild with an unchanged base restarts nothing.
                "org.opencontainers.image.created": mirror.commit_info(rev.sha)["committed_at"],
                "dev.pipeline.image": b.image,
            }
            if rev.version:
                labels["org.opencontainers.image.version"] = rev.version
            name_tag = rev.version or docker_tag(rev.ref.rsplit("/", 1)[-1] or "latest")
            if self.cfg.registry is None:
                return self._build_on_hosts(b, rev, context, dockerfile, labels, run_id, pull)
            repository = f"{self.cfg.registry.address}/{b.image}"
            tags = [f"{repository}:{rev.sha[:12]}", f"{repository}:{name_tag}"]
            host = image.build_host or self.cfg.pipeline.build_host
            self._build_step(b, rev, run_id, host, context, dockerfile, tags, labels, pull)
            digest = self._push(b, rev, repository, [rev.sha[:12], name_tag], run_id, host)
            ref = f"{repository}@{digest}"
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self.state.record_build(b.image, rev.sha, digest, ref, image_spec_hash(image), run_id)
        blog.info("image pushed", digest=digest)
        self.report(f"{b.image}: pushed {ref}")
        return Artifact(b.image, rev.sha, digest, ref)

    def _export(self, b: Build, rev: Revision, workdir: Path) -> tuple[Path, str]:
        """Write the build context at `rev`; a Dockerfile outside the context is copied in."""
        image = self.cfg.images[b.image]
        mirror = self.connections.mirror(b.repo)
        context = workdir / "context"
        context.mkdir()
        mirror.export(rev.sha, context, "" if image.context == "." else image.context)
        dockerfile = image.dockerfile_path
        prefix = "" if image.context == "." else image.context + "/"
        if dockerfile.startswith(prefix):
            return context, dockerfile.removeprefix(prefix)
        content = mirror.read_file(rev.sha, dockerfile)
        if content is None:
            raise PipelineError(
                f"image {b.image}: Dockerfile {dockerfile} not found at {rev.sha[:12]}"
            )
        target = context / ".pipeline.Dockerfile"
        # A file or symlink of that name from the commit is replaced, never written through.
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        return context, ".pipeline.Dockerfile"

    def _build_step(
        self,
        b: Build,
        rev: Revision,
        run_id: int | None,
        host: str | None,
        context: Path,
        dockerfile: str,
        tags: list[str],
        labels: dict[str, str],
        pull: bool = False,
    ) -> str:
        steps = StepLog(self.state, b.image)
        step = steps.start(run_id, "build", host, rev.sha, f"tags {', '.join(tags)}")
        blog = log.bind(image=b.image, revision=rev.sha[:12], host=host or "local")
        tty = sys.stderr.isatty()

        def output(line: str) -> None:
            line = line.rstrip()
            if not line:
                return
            blog.debug("build output", line=line)
            if tty:  # a live progress line on a terminal; logs keep the full output
                sys.stderr.write(f"\r\033[2K  {b.image}: {line[:100]}")
                sys.stderr.flush()

        image = self.cfg.images[b.image]
        choice = self.choice(b.image)
        engine = self.connections.engine(host)
        try:
            if choice.kind == "legacy" or choice.cli is None:
                self.report(f"{b.image}: {choice.notice}")
                image_id = engine.build(
                    context,
                    dockerfile,
                    tags,
                    labels=labels,
                    build_args=image.build_args,
                    pull=pull,
                    target=image.target,
                    on_output=output,
                )
            else:
                blog.info("building", builder=choice.notice)
                self.check([b])  # a secret removed since the plan: say so, build nothing
                if pull:  # the engine pulls (it trusts certs.d), BuildKit then finds it locally
                    self._pull_bases(engine, context / dockerfile, image.build_args)
                spec = CliBuild(
                    context=context,
                    dockerfile=dockerfile,
                    tags=tags,
                    labels=labels,
                    build_args=image.build_args,
                    iidfile=context.parent / f"iid-{host or 'local'}",
                    target=image.target,
                    secrets=[
                        SecretSource(s.id, s.kind, str(self._secret_path(s)), s.key)
                        if s.kind == "file"
                        else s
                        for s in secret_sources(image)
                    ],
                    cache_from=image.cache_from,
                    cache_to=image.cache_to,
                )
                args, env = cli_build_args(choice.kind, spec)
                image_id = engine.build_cli(
                    choice.cli, args, env=env, iidfile=spec.iidfile, on_output=output
                )
        except PipelineError as exc:
            steps.end(step, "failed", error=str(exc))
            raise
        finally:
            if tty:
                sys.stderr.write("\r\033[2K")
        steps.end(step, "succeeded", detail=image_id)
        return image_id

    def _push(
        self,
        b: Build,
        rev: Revision,
        repository: str,
        tags: list[str],
        run_id: int | None,
        host: str | None,
    ) -> str:
        reg = self.cfg.registry
        assert reg is not None
        auth = self.connections.registry_auth()
        engine = self.connections.engine(host)
        digest = ""

        def retrying(failed: int, _exc: BaseException, _wait: float) -> None:
            self.report(f"{b.image}: push retry {failed + 1}/{self.retry.attempts}")

        steps = StepLog(self.state, b.image)
        for tag in tags:
            step = steps.start(run_id, "push", host, rev.sha, f"{repository}:{tag}")
            try:
                pushed = self.retry.call(
                    partial(engine.push, repository, tag, auth=auth),
                    f"push {repository}:{tag}",
                    on_retry=retrying,
                )
            except PipelineError as exc:
                steps.end(step, "failed", error=str(exc))
                raise PipelineError(f"push to {reg.address} failed: {exc}") from exc
            digest = pushed or digest
            steps.end(step, "succeeded", detail=digest)
        return digest

    def _build_on_hosts(
        self,
        b: Build,
        rev: Revision,
        context: Path,
        dockerfile: str,
        labels: dict[str, str],
        run_id: int | None,
        pull: bool = False,
    ) -> Artifact:
        """No registry: every host that runs the image builds it from the same context."""
        hosts = sorted(
            {h for s in self.loaded.services_of_image(b.image) for h in self.cfg.services[s].hosts}
        )
        tag = f"pipeline/{b.image}:{rev.sha[:12]}"
        ids = [
            self._build_step(b, rev, run_id, h, context, dockerfile, [tag], labels, pull)
            for h in hosts
        ]
        digest = ids[0] if ids else ""
        image = self.cfg.images[b.image]
        self.state.record_build(b.image, rev.sha, digest, tag, image_spec_hash(image), run_id)
        return Artifact(b.image, rev.sha, digest, tag)
