"""The pure planner: from config, what git says changed and what was last built and deployed,
decide which images to build and which services to roll out. No I/O of any kind.

The caller gathers facts (`RepoSnapshot` per fetched repo, the last `ImageRecord` and
`ServiceRecord`s, env file contents); `plan` returns a `Plan` an executor applies, or
`pipeline plan` prints.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pipeline.config.model import (
    DEFAULT_MONITOR,
    Config,
    HealthSection,
    ImageSection,
    ServiceSection,
    to_data,
)
from pipeline.plan.blocked import Blocked
from pipeline.plan.dockerignore import DockerIgnore, DockerIgnoreError
from pipeline.plan.rollback import PinRecord

if TYPE_CHECKING:
    import pathspec

_SHOWN_PATHS = 5  # changed paths named in a reason before "+N more"
_SHORT = 12  # characters of a sha shown in messages


@dataclass(frozen=True)
class ImageRecord:
    """The image's last successful build."""

    revision: str  # commit it was built from
    digest: str  # what it pushed
    spec_hash: str  # image_spec_hash at that build


@dataclass(frozen=True)
class ServiceRecord:
    """What is deployed: the last successful rollout of the service, on all its hosts."""

    revision: str
    digest: str
    spec_hash: str  # service_spec_hash at that rollout
    # Where it runs now (its hosts, or its cluster's name); None: not known, taken as all.
    targets: frozenset[str] | None = None


@dataclass(frozen=True)
class RepoSnapshot:
    """What the caller read from git for one repo at its new revision."""

    repo: str
    revision: str  # new commit sha
    files: frozenset[str]  # every file path in the tree at revision
    # old sha -> paths changed old..new; None (or a missing old sha) = unknown: all changed
    changes: Mapping[str, frozenset[str] | None]
    # context dir ("." or "web") -> its .dockerignore text, only for contexts that have one
    dockerignores: Mapping[str, str]
    # paths in `files` that are submodules: a folder of files this tree does not list
    submodules: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Build:
    """Build `image` from `repo` at `revision`."""

    image: str
    repo: str
    revision: str
    reason: str


@dataclass(frozen=True)
class Rollout:
    """Roll `service` out at `revision`: after its image's Build (rebuild) or from its current
    digest (rebuild=False, a definition change or a rollout that did not land)."""

    service: str
    image: str
    revision: str
    reason: str
    rebuild: bool


@dataclass(frozen=True)
class Problem:
    """Something that needs a human, named by config key: ("images.web", "Dockerfile ...").

    `error`: the subject cannot be planned at all (a service whose env_file cannot be read),
    and the run fails; otherwise a note (a service held back on purpose, an image waiting)."""

    subject: str
    message: str
    error: bool = False


@dataclass(frozen=True)
class Plan:
    """Builds and rollouts to apply, in name order, and the problems that held some back;
    `unpin` names the services whose pin a newer commit released (applying removes it)."""

    builds: tuple[Build, ...] = ()
    rollouts: tuple[Rollout, ...] = ()
    problems: tuple[Problem, ...] = ()
    unpin: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain lists of dicts, for `pipeline plan --json` and the API."""
        return {
            "builds": [
                {"image": b.image, "repo": b.repo, "revision": b.revision, "reason": b.reason}
                for b in self.builds
            ],
            "rollouts": [
                {
                    "service": r.service,
                    "image": r.image,
                    "revision": r.revision,
                    "reason": r.reason,
                    "rebuild": r.rebuild,
                }
                for r in self.rollouts
            ],
            "problems": [
                {"subject": p.subject, "message": p.message, "error": p.error}
                for p in self.problems
            ],
        }

    @property
    def empty(self) -> bool:
        """Nothing to build or roll out (problems are not work: check them separately)."""
        return not self.builds and not self.rollouts

    @property
    def errors(self) -> tuple[Problem, ...]:
        """The problems that fail the run (`Problem.error`)."""
        return tuple(p for p in self.problems if p.error)


def _sha256(data: object) -> str:
    encoded = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def image_spec_hash(image: ImageSection) -> str:
    """Hash of what defines a build besides the files: context, Dockerfile, build args, watch,
    target and the secrets' sources (not their values)."""
    data: dict[str, object] = {
        "context": image.context,
        "dockerfile": image.dockerfile_path,
        "build_args": image.build_args,
        "watch": list(image.watch),  # order kept: a later `!` glob overrides an earlier one
    }
    # Keys added later count only when set, so that upgrading pipeline rebuilds nothing. The
    # secrets' names count (a different secret can make a different image), never their values.
    if image.target:
        data["target"] = image.target
    if image.secrets:
        data["secrets"] = image.secrets
    return _sha256(data)


def service_spec_hash(service: ServiceSection, env_file_text: str | None = None) -> str:
    """Hash of a service's runtime definition; hosts, strategy and max_parallel are left out
    so that changing them never restarts a container (a host added to `hosts` is seen from
    `ServiceRecord.targets` instead)."""
    return _sha256(
        {
            "image": service.image,
            "ports": list(service.ports),
            "env": service.env,
            "env_file": env_file_text,  # the content: a changed file restarts, a moved one not
            "command": service.command,
            "volumes": list(service.volumes),
            "cpus": service.cpus,
            "memory": service.memory,
            "network": service.network,
            "restart": service.restart,
            "labels": service.labels,
            "health": _health_for_hash(service.health),
            # A cluster service's Swarm settings; absent for a host service, whose hash (and so
            # its containers) stays what it was before clusters existed.
            **(
                {
                    "replicas": service.replicas,
                    "placement": list(service.placement),
                    "networks": list(service.networks),
                    "endpoint_mode": service.endpoint_mode,
                }
                if service.cluster
                else {}
            ),
        }
    )


def _health_for_hash(health: HealthSection) -> dict[str, object]:
    """The health table as hashed: every key counts, but keys added to pipeline later count only
    when set away from their default, so that upgrading pipeline restarts no container."""
    data = to_data(health)
    if health.monitor == DEFAULT_MONITOR:
        del data["monitor"]
    return data


@lru_cache(maxsize=1024)
def _watch_spec(globs: tuple[str, ...]) -> pathspec.PathSpec | None:
    import pathspec  # here: everything that reads the state imports this module, few plan builds

    # Cached: the same config is planned again on every commit, compiling is the costly part.
    return pathspec.PathSpec.from_lines("gitignore", globs) if globs else None


@lru_cache(maxsize=1024)
def _dockerignore(text: str) -> DockerIgnore:
    return DockerIgnore.from_text(text)


def image_inputs_changed(
    image: ImageSection,
    paths: Iterable[str],
    dockerignore: DockerIgnore | None,
    submodules: frozenset[str] = frozenset(),
) -> list[str]:
    """The paths (repo-relative) that are inputs of `image`, sorted: its Dockerfile, files of
    its context that `dockerignore` keeps (plus the .dockerignore itself), its watch globs.
    A path in `submodules` stands for the folder of a submodule: an input unless `dockerignore`
    leaves out everything under it."""
    dockerfile = image.dockerfile_path
    context = image.context
    prefix = "" if context == "." else context + "/"
    watch = _watch_spec(tuple(image.watch))
    found = set()
    for path in paths:
        if path == dockerfile:
            found.add(path)
            continue
        if path.startswith(prefix):
            relative = path[len(prefix) :]
            if (
                relative == ".dockerignore"
                or dockerignore is None
                or not (
                    dockerignore.excludes_all_under(relative)
                    if path in submodules
                    else dockerignore.excludes(relative)
                )
            ):
                found.add(path)
                continue
        if watch is not None and watch.match_file(path):
            found.add(path)
    return sorted(found)


def _short(revision: str) -> str:
    return revision[:_SHORT]


def _changed_reason(paths: list[str]) -> str:
    shown = ", ".join(paths[:_SHOWN_PATHS])
    more = len(paths) - _SHOWN_PATHS
    return f"changed: {shown}" + (f" +{more} more" if more > 0 else "")


def _image_reason(
    name: str,
    image: ImageSection,
    snapshot: RepoSnapshot,
    record: ImageRecord | None,
    forced: str | None,
) -> tuple[str | None, Problem | None]:
    """Why `image` must be built at the snapshot (None: it need not), or why it cannot be;
    `forced` is the reason given when it is built on request."""
    subject = f"images.{name}"
    if image.dockerfile_path not in snapshot.files:
        return None, Problem(
            subject,
            f"Dockerfile {image.dockerfile_path} not found at {_short(snapshot.revision)}",
        )
    ignore_text = snapshot.dockerignores.get(image.context)
    try:
        ignore = _dockerignore(ignore_text) if ignore_text is not None else None
    except DockerIgnoreError as exc:
        where = ".dockerignore" if image.context == "." else f"{image.context}/.dockerignore"
        return None, Problem(subject, f"{where} at {_short(snapshot.revision)}: {exc}")
    if record is None:
        return "never built", None
    if forced is not None:
        return forced, None
    if record.spec_hash != image_spec_hash(image):
        return (
            "definition changed: context, dockerfile, build_args, watch, target or secrets "
            "differ from the "
            f"build at {_short(record.revision)}",
            None,
        )
    if record.revision == snapshot.revision:
        return None, None
    changed = snapshot.changes.get(record.revision)
    if changed is None:
        return "history unknown (force push or first fetch): rebuilding", None
    inputs = image_inputs_changed(image, changed, ignore, snapshot.submodules)
    return (_changed_reason(inputs) if inputs else None), None


def plan(
    config: Config,
    snapshots: Mapping[str, RepoSnapshot],
    images: Mapping[str, ImageRecord],
    services: Mapping[str, ServiceRecord],
    *,
    env_files: Mapping[str, str] | None = None,
    env_file_errors: Mapping[str, str] | None = None,
    failed: Mapping[str, str | ServiceRecord | Blocked] | None = None,
    force_images: Iterable[str] = (),
    force_reason: str = "requested",
    only_services: Iterable[str] | None = None,
    pins: Mapping[str, PinRecord] | None = None,
) -> Plan:
    """Decide the builds and rollouts for the repos in `snapshots` (others are left alone).

    `env_files` maps a service name to the content of its `env_file`, `env_file_errors` to
    why it could not be read (that service is not rolled out: an error `Problem`); `failed`
    maps a service to the revision kept out of rollouts (a `Blocked`, saying why, or the bare
    revision or record of the rollout that failed last), which is not rolled out unless the
    service's definition changed; `force_images` are built even if unchanged, with
    `force_reason` as the plan's reason; `only_services` limits rollouts, and the builds they
    need, to those services. A service in `pins` is left alone while its repo's snapshot is
    the head it was pinned at; another commit releases it (`Plan.unpin`) and it is planned
    as usual.
    """
    env_files = env_files or {}
    env_file_errors = env_file_errors or {}
    failed = failed or {}
    pins = pins or {}
    unpin: list[str] = []
    forced = set(force_images)
    selected = None if only_services is None else set(only_services)
    problems: list[Problem] = []
    builds: dict[str, Build] = {}
    broken: set[str] = set()  # images that cannot be built at their snapshot

    for name in sorted(forced - config.images.keys()):
        problems.append(Problem(f"images.{name}", "unknown image: cannot build it"))
    for name in sorted((selected or set()) - config.services.keys()):
        problems.append(Problem(f"services.{name}", "unknown service: cannot roll it out"))

    for name, image in sorted(config.images.items()):
        snapshot = snapshots.get(image.repo)
        if snapshot is None:
            if name in forced:
                problems.append(
                    Problem(f"images.{name}", f"repo {image.repo} was not fetched: cannot build")
                )
            continue
        reason, problem = _image_reason(
            name, image, snapshot, images.get(name), force_reason if name in forced else None
        )
        if problem is not None:
            problems.append(problem)
            broken.add(name)
        elif reason is not None:
            builds[name] = Build(name, image.repo, snapshot.revision, reason)

    rollouts: list[Rollout] = []
    for name, service in sorted(config.services.items()):
        if selected is not None and name not in selected:
            continue
        of_image = config.images.get(service.image)
        if of_image is None or of_image.repo not in snapshots or service.image in broken:
            continue  # another repo's business, or its image's problem is already reported
        pin = pins.get(name)
        if pin is not None:
            if snapshots[of_image.repo].revision == (pin.head or pin.revision):
                problems.append(_pinned(name, pin))
                continue
            unpin.append(name)
        if name in env_file_errors:
            problems.append(Problem(f"services.{name}", env_file_errors[name], error=True))
            continue
        rollout, problem = _service_rollout(
            name,
            service,
            snapshots[of_image.repo],
            images.get(service.image),
            services.get(name),
            builds,
            env_files.get(name) if service.env_file else None,
            failed.get(name),
        )
        if problem is not None:
            problems.append(problem)
        if rollout is not None:
            rollouts.append(rollout)

    if selected is not None:
        needed = {r.image for r in rollouts if r.rebuild} | forced
        builds = {n: b for n, b in builds.items() if n in needed}
        relevant = {f"services.{s}" for s in selected} | {
            f"images.{config.services[s].image}" for s in selected if s in config.services
        }
        relevant |= {f"images.{n}" for n in forced}
        problems = [p for p in problems if p.subject in relevant]

    return Plan(
        builds=tuple(builds[n] for n in sorted(builds)),
        rollouts=tuple(rollouts),
        problems=tuple(sorted(problems, key=lambda p: (not p.error, p.subject, p.message))),
        unpin=tuple(unpin),
    )


def _pinned(name: str, pin: PinRecord) -> Problem:
    since = pin.since.strftime("%Y-%m-%d %H:%M:%S")
    return Problem(
        f"services.{name}",
        f"pinned at {_short(pin.revision)} by {pin.reason} at {since} UTC; a newer commit or "
        f"`pipeline deploy {name}` releases it",
    )


def _service_rollout(
    name: str,
    service: ServiceSection,
    snapshot: RepoSnapshot,
    image_record: ImageRecord | None,
    record: ServiceRecord | None,
    builds: dict[str, Build],
    env_file_text: str | None,
    failed_attempt: str | ServiceRecord | Blocked | None,
) -> tuple[Rollout | None, Problem | None]:
    """The rollout `name` needs, if any; may add the Build of its image to `builds`."""
    spec = service_spec_hash(service, env_file_text)
    spec_changed = record is not None and record.spec_hash != spec
    rebuilt = service.image in builds
    reasons: list[str] = []
    if record is None:
        reasons.append("never deployed")
    elif spec_changed:
        reasons.append("definition changed")
    if record is not None and record.targets is not None:
        # A host added to `hosts` gets the service (every host is rolled, as a deploy does).
        added = [t for t in service.targets if t not in record.targets]
        if added:
            reasons.append(f"not deployed on {', '.join(added)}")
    if rebuilt:
        reasons.append(f"image {service.image} rebuilt")
    elif record is not None and image_record is not None and record.digest != image_record.digest:
        # An earlier rollout did not land everywhere; converge on the image's current build.
        reasons.append("deployed digest differs from the image's current build")
    if not reasons:
        return None, None

    rebuild = rebuilt or image_record is None
    if rebuild and not rebuilt:
        builds[service.image] = Build(
            service.image, snapshot.repo, snapshot.revision, f"needed by service {name}"
        )
    revision = image_record.revision if image_record and not rebuild else snapshot.revision
    # A failed attempt given as a record is retried only once the definition differs from
    # the one that failed; given as a bare revision, once it differs from the deployed one.
    why = "failed before; waiting for a newer commit (pipeline deploy forces it)"
    if isinstance(failed_attempt, Blocked | ServiceRecord):
        failed_revision: str | None = failed_attempt.revision
        retry_anyway = failed_attempt.spec_hash != spec
        if isinstance(failed_attempt, Blocked):
            why = failed_attempt.why
    else:
        failed_revision, retry_anyway = failed_attempt, spec_changed
    if failed_revision is not None and failed_revision == revision and not retry_anyway:
        # Retrying the same revision would loop (or, after an infrastructure failure, come
        # before its backoff); a newer commit or `pipeline deploy` moves on.
        return None, Problem(f"services.{name}", f"revision {_short(revision)} {why}")
    return Rollout(name, service.image, revision, "; ".join(reasons), rebuild), None
