"""The planner as a table: config, what changed and what was built/deployed in; a plan out.

Every case starts from "everything built and deployed at OLD with the config `old_toml`"
(default: the current config) and plans the commit NEW of repo `app`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline.config.load import parse
from pipeline.config.model import Config, ServiceSection, decode
from pipeline.plan.planner import (
    ImageRecord,
    Plan,
    RepoSnapshot,
    ServiceRecord,
    image_inputs_changed,
    image_spec_hash,
    plan,
    service_spec_hash,
)

OLD = "1111111111111111111111111111111111111111"
NEW = "2a2b2c2d2e2f3a3b3c3d3e3f4a4b4c4d4e4f5a5b"
HISTORY_UNKNOWN = "history unknown (force push or first fetch): rebuilding"
DEFINITION_CHANGED = (
    "definition changed: context, dockerfile, build_args, watch, target or secrets differ from the "
    "build at " + OLD[:12]
)

HEAD = """
[hosts.h1]
docker = "unix:///var/run/docker.sock"
[hosts.h2]
docker = "tcp://10.0.0.2:2375"
[repos.app]
url = "https://example.com/app.git"
[repos.other]
url = "https://example.com/other.git"
[images.tool]
repo = "other"
[services.tool]
image = "tool"
hosts = ["h1"]
"""


def _app(
    web: str = "",
    api: str = "",
    svc_web: str = "",
    svc_api: str = 'env = { LOG = "info" }\nmemory = "256m"',
    web_ports: str = '["8080:80"]',
    api_hosts: str = '["h1", "h2"]',
) -> str:
    """Repo `app` with images web/ and api/; services web and web-worker on web, api on api."""
    return (
        HEAD
        + f"""
[images.web]
repo = "app"
context = "web"
{web}
[images.api]
repo = "app"
context = "api"
{api}
[services.web]
image = "web"
hosts = ["h1"]
ports = {web_ports}
{svc_web}
[services.web-worker]
image = "web"
hosts = ["h1"]
[services.api]
image = "api"
hosts = {api_hosts}
{svc_api}
"""
    )


NESTED = (
    HEAD
    + """
[images.root]
repo = "app"
[images.a]
repo = "app"
context = "svc/a"
[services.root]
image = "root"
hosts = ["h1"]
[services.a]
image = "a"
hosts = ["h1"]
"""
)

FILES = frozenset(
    {
        "Dockerfile",
        "README.md",
        ".dockerignore",
        "docker/web.Dockerfile",
        "web/Dockerfile",
        "web/.dockerignore",
        "web/index.html",
        "web/app.js",
        "web/README.md",
        "web/docs/x.md",
        "web/docs/README.md",
        "api/Dockerfile",
        "api/main.py",
        "shared/util.py",
        "svc/a/Dockerfile",
        "svc/a/main.go",
    }
)
WEB_IGNORE = "# docs are not shipped\n*.md\ndocs/\n!README.md\n"


@dataclass(frozen=True)
class Case:
    id: str
    toml: str
    changed: frozenset[str] | None  # OLD..NEW; None = history unknown
    builds: Mapping[str, str] = field(default_factory=dict)  # image -> reason
    rollouts: Mapping[str, tuple[str, bool, str]] = field(default_factory=dict)
    problems: Mapping[str, str] = field(default_factory=dict)  # subject -> message
    old_toml: str | None = None  # the config of the last builds/rollouts
    revision: str = NEW  # the snapshot's revision
    files: frozenset[str] = FILES
    dockerignores: Mapping[str, str] = field(default_factory=dict)
    unbuilt: frozenset[str] = frozenset()  # images without an ImageRecord
    undeployed: frozenset[str] = frozenset()  # services without a ServiceRecord
    stale: frozenset[str] = frozenset()  # services whose deployed digest is an older one
    env_files: Mapping[str, str] = field(default_factory=dict)  # service -> env_file text
    old_env_files: Mapping[str, str] | None = None
    env_file_errors: Mapping[str, str] = field(default_factory=dict)  # service -> its problem
    failed: Mapping[str, str] = field(default_factory=dict)
    force: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None


def rebuilt(image: str, revision: str = NEW) -> tuple[str, bool, str]:
    return (revision, True, f"image {image} rebuilt")


CASES = [
    Case(
        "commit touching only web builds and rolls out only web",
        _app(),
        frozenset({"web/index.html", "web/app.js"}),
        builds={"web": "changed: web/app.js, web/index.html"},
        rollouts={"web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "commit touching only api leaves web alone",
        _app(),
        frozenset({"api/main.py"}),
        builds={"api": "changed: api/main.py"},
        rollouts={"api": rebuilt("api")},
    ),
    Case(
        "a shared directory watched by both images rebuilds both",
        _app(web='watch = ["shared/"]', api='watch = ["shared/**/*.py"]'),
        frozenset({"shared/util.py"}),
        builds={"web": "changed: shared/util.py", "api": "changed: shared/util.py"},
        rollouts={"api": rebuilt("api"), "web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "a watched path outside every context does not rebuild an image that does not watch it",
        _app(api='watch = ["shared/"]'),
        frozenset({"shared/util.py"}),
        builds={"api": "changed: shared/util.py"},
        rollouts={"api": rebuilt("api")},
    ),
    Case(
        "more than five changed inputs are summarised with +N more",
        _app(),
        frozenset(f"web/f{i}.js" for i in range(8)),
        builds={"web": "changed: web/f0.js, web/f1.js, web/f2.js, web/f3.js, web/f4.js +3 more"},
        rollouts={"web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "a change under a nested context rebuilds it and the root-context image",
        NESTED,
        frozenset({"svc/a/main.go"}),
        builds={"a": "changed: svc/a/main.go", "root": "changed: svc/a/main.go"},
        rollouts={"a": rebuilt("a"), "root": rebuilt("root")},
    ),
    Case(
        "a root .dockerignore excluding svc/ keeps the root image out of a nested change",
        NESTED,
        frozenset({"svc/a/main.go"}),
        dockerignores={".": "svc/\n"},
        builds={"a": "changed: svc/a/main.go"},
        rollouts={"a": rebuilt("a")},
    ),
    Case(
        "a change to the root .dockerignore itself rebuilds the root image",
        NESTED,
        frozenset({".dockerignore"}),
        dockerignores={".": "svc/\n"},
        builds={"root": "changed: .dockerignore"},
        rollouts={"root": rebuilt("root")},
    ),
    Case(
        "a README.md re-included by `!README.md` rebuilds",
        _app(),
        frozenset({"web/README.md"}),
        dockerignores={"web": WEB_IGNORE},
        builds={"web": "changed: web/README.md"},
        rollouts={"web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "markdown and docs/ excluded by the context's .dockerignore do not rebuild",
        _app(),
        frozenset({"web/docs/x.md", "web/docs/README.md", "web/NOTES.md"}),
        dockerignores={"web": WEB_IGNORE},
    ),
    Case(
        "the Dockerfile counts even when the .dockerignore excludes it",
        _app(),
        frozenset({"web/Dockerfile", "web/docs/x.md"}),
        dockerignores={"web": "Dockerfile\ndocs\n"},
        builds={"web": "changed: web/Dockerfile"},
        rollouts={"web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "a watched path counts even when the .dockerignore excludes it",
        _app(web='watch = ["web/docs/"]'),
        frozenset({"web/docs/x.md"}),
        dockerignores={"web": WEB_IGNORE},
        builds={"web": "changed: web/docs/x.md"},
        rollouts={"web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "a Dockerfile outside the context is an input",
        _app(web='dockerfile = "docker/web.Dockerfile"'),
        frozenset({"docker/web.Dockerfile"}),
        builds={"web": "changed: docker/web.Dockerfile"},
        rollouts={"web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "a moved Dockerfile changes the image definition and rebuilds",
        _app(web='dockerfile = "docker/web.Dockerfile"'),
        frozenset({"docker/web.Dockerfile"}),
        old_toml=_app(),
        builds={"web": DEFINITION_CHANGED},
        rollouts={"web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "a changed build arg rebuilds even at the same revision",
        _app(api='build_args = { VERSION = "2" }'),
        frozenset(),
        old_toml=_app(api='build_args = { VERSION = "1" }'),
        revision=OLD,
        builds={"api": DEFINITION_CHANGED},
        rollouts={"api": rebuilt("api", OLD)},
    ),
    Case(
        "a deleted image directory is a problem: no build, no rollout of its services",
        _app(),
        frozenset({"web/Dockerfile", "web/index.html", "web/app.js"}),
        files=frozenset(p for p in FILES if not p.startswith("web/")),
        problems={"images.web": f"Dockerfile web/Dockerfile not found at {NEW[:12]}"},
    ),
    Case(
        "a force push (history unknown) rebuilds every image of the repo",
        _app(),
        None,
        builds={"api": HISTORY_UNKNOWN, "web": HISTORY_UNKNOWN},
        rollouts={"api": rebuilt("api"), "web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "a host added to a service's hosts rolls the current digest out without a build",
        _app(),
        frozenset(),
        old_toml=_app(api_hosts='["h1"]'),
        rollouts={"api": (OLD, False, "not deployed on h2")},
    ),
    Case(
        "a host taken away from a service's hosts rolls nothing out",
        _app(api_hosts='["h1"]'),
        frozenset(),
        old_toml=_app(),
    ),
    Case(
        "env and memory changes roll out the current digest without a build",
        _app(svc_api='env = { LOG = "debug" }\nmemory = "512m"'),
        frozenset(),
        old_toml=_app(),
        rollouts={"api": (OLD, False, "definition changed")},
    ),
    Case(
        "a service whose env_file cannot be read fails with its message; the others roll out, "
        "another repo's service is not this plan's business",
        _app(svc_web='env_file = "web.env"'),
        frozenset({"web/index.html"}),
        env_file_errors={
            "web": "pipeline.toml:20: services.web.env_file: cannot read web.env",
            "tool": "pipeline.toml:10: services.tool.env_file: cannot read tool.env",
        },
        builds={"web": "changed: web/index.html"},
        rollouts={"web-worker": rebuilt("web")},
        problems={"services.web": "pipeline.toml:20: services.web.env_file: cannot read web.env"},
    ),
    Case(
        "a definition change on a service whose image is rebuilt rides on the build",
        _app(svc_api='env = { LOG = "debug" }'),
        frozenset({"api/main.py"}),
        old_toml=_app(),
        builds={"api": "changed: api/main.py"},
        rollouts={"api": (NEW, True, "definition changed; image api rebuilt")},
    ),
    Case(
        "changing hosts, strategy or max_parallel restarts nothing",
        _app(
            svc_web='max_parallel = 3\nstrategy = "start-first"',
            web_ports="[]",
            api_hosts='["h2"]',
        ),
        frozenset(),
        old_toml=_app(web_ports="[]"),
    ),
    Case(
        "a changed env_file content rolls out; the same content does not",
        _app(svc_api='env_file = "api.env"', svc_web='env_file = "web.env"'),
        frozenset(),
        env_files={"api": "A=2\n", "web": "B=1\n"},
        old_env_files={"api": "A=1\n", "web": "B=1\n"},
        rollouts={"api": (OLD, False, "definition changed")},
    ),
    Case(
        "a never deployed service is rolled out from its image's current build",
        _app(),
        frozenset(),
        undeployed=frozenset({"web"}),
        rollouts={"web": (OLD, False, "never deployed")},
    ),
    Case(
        "a never deployed service whose image was never built gets a build",
        _app(),
        frozenset(),
        unbuilt=frozenset({"web"}),
        undeployed=frozenset({"web", "web-worker"}),
        builds={"web": "never built"},
        rollouts={
            "web": (NEW, True, "never deployed; image web rebuilt"),
            "web-worker": (NEW, True, "never deployed; image web rebuilt"),
        },
    ),
    Case(
        "a rollout that did not land is converged on the image's current build",
        _app(),
        frozenset(),
        stale=frozenset({"api"}),
        rollouts={"api": (OLD, False, "deployed digest differs from the image's current build")},
    ),
    Case(
        "a revision that failed its rollout is not retried",
        _app(),
        frozenset({"web/app.js"}),
        failed={"web": NEW},
        builds={"web": "changed: web/app.js"},
        rollouts={"web-worker": rebuilt("web")},
        problems={
            "services.web": f"revision {NEW[:12]} failed before; waiting for a newer commit "
            "(pipeline deploy forces it)"
        },
    ),
    Case(
        "a newer commit than the failed revision is rolled out",
        _app(),
        frozenset({"web/app.js"}),
        failed={"web": OLD},
        builds={"web": "changed: web/app.js"},
        rollouts={"web": rebuilt("web"), "web-worker": rebuilt("web")},
    ),
    Case(
        "a failed convergence is not retried",
        _app(),
        frozenset(),
        stale=frozenset({"api"}),
        failed={"api": OLD},
        problems={
            "services.api": f"revision {OLD[:12]} failed before; waiting for a newer commit "
            "(pipeline deploy forces it)"
        },
    ),
    Case(
        "a failed revision is retried once the service definition changes",
        _app(svc_api='env = { LOG = "debug" }'),
        frozenset(),
        old_toml=_app(),
        stale=frozenset({"api"}),
        failed={"api": OLD},
        rollouts={
            "api": (
                OLD,
                False,
                "definition changed; deployed digest differs from the image's current build",
            )
        },
    ),
    Case(
        "a requested image is built though nothing changed",
        _app(),
        frozenset(),
        force=("api",),
        builds={"api": "requested"},
        rollouts={"api": rebuilt("api")},
    ),
    Case(
        "only_services restricts rollouts and builds to those services",
        _app(),
        frozenset({"web/app.js", "api/main.py"}),
        only=("api",),
        builds={"api": "changed: api/main.py"},
        rollouts={"api": rebuilt("api")},
    ),
    Case(
        "services of a repo without a snapshot are untouched, even with a changed definition",
        _app().replace(
            '[services.tool]\nimage = "tool"', '[services.tool]\nimage = "tool"\ncpus = 2.0'
        ),
        frozenset(),
        old_toml=_app(),
    ),
    Case(
        "a change outside every image's inputs gives an empty plan",
        _app(),
        frozenset({"README.md", "shared/util.py"}),
    ),
    Case(
        "a snapshot at the recorded revision gives an empty plan",
        _app(),
        frozenset({"web/app.js"}),
        revision=OLD,
    ),
]


def _config(toml: str) -> Config:
    return parse(toml, Path("pipeline.toml")).model


def _run(case: Case) -> Plan:
    old, new = _config(case.old_toml or case.toml), _config(case.toml)
    old_env = case.env_files if case.old_env_files is None else case.old_env_files
    image_records = {
        name: ImageRecord(OLD, f"sha256:{name}", image_spec_hash(image))
        for name, image in old.images.items()
        if name not in case.unbuilt
    }
    service_records = {
        name: ServiceRecord(
            OLD,
            f"sha256:{svc.image}" + ("-older" if name in case.stale else ""),
            service_spec_hash(svc, old_env.get(name) if svc.env_file else None),
            frozenset(svc.targets),
        )
        for name, svc in old.services.items()
        if name not in case.undeployed
    }
    snapshot = RepoSnapshot(
        repo="app",
        revision=case.revision,
        files=case.files,
        changes={OLD: case.changed},
        dockerignores=case.dockerignores,
    )
    return plan(
        new,
        {"app": snapshot},
        image_records,
        service_records,
        env_files=case.env_files,
        env_file_errors=case.env_file_errors,
        failed=case.failed,
        force_images=case.force,
        only_services=case.only,
    )


def _expected(case: Case) -> dict[str, Any]:
    return {
        "builds": [
            {"image": image, "repo": "app", "revision": case.revision, "reason": reason}
            for image, reason in sorted(case.builds.items())
        ],
        "rollouts": [
            {
                "service": service,
                "image": "api" if service == "api" else service.removesuffix("-worker"),
                "revision": revision,
                "reason": reason,
                "rebuild": rebuild,
            }
            for service, (revision, rebuild, reason) in sorted(case.rollouts.items())
        ],
        "problems": sorted(
            (
                {
                    "subject": subject,
                    "message": message,
                    "error": subject.removeprefix("services.") in case.env_file_errors,
                }
                for subject, message in case.problems.items()
            ),
            key=lambda p: (not p["error"], p["subject"], p["message"]),
        ),
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan(case: Case) -> None:
    """The plan for each case has exactly the expected builds, rollouts and problems."""
    assert _run(case).to_json() == _expected(case)


def test_nothing_to_do_is_empty_with_empty_lists() -> None:
    """A plan with nothing to do is `empty` and serialises to three empty lists."""
    result = _run(Case("unchanged", _app(), frozenset()))
    assert result.empty
    assert result.to_json() == {"builds": [], "rollouts": [], "problems": []}


def test_unknown_old_revision_counts_as_history_unknown() -> None:
    """A recorded revision missing from `changes` is treated like None: everything changed."""
    config = _config(_app())
    records = {n: ImageRecord("f" * 40, "d", image_spec_hash(i)) for n, i in config.images.items()}
    snapshot = RepoSnapshot("app", NEW, FILES, {OLD: frozenset()}, {})
    result = plan(config, {"app": snapshot}, records, {})
    assert {b.image: b.reason for b in result.builds} == {
        "api": HISTORY_UNKNOWN,
        "web": HISTORY_UNKNOWN,
    }


def test_bad_dockerignore_is_a_problem() -> None:
    """A .dockerignore Docker would refuse blocks its image's build with a located problem."""
    result = _run(
        Case("bad", _app(), frozenset({"web/app.js"}), dockerignores={"web": "ok\n[abc\n"})
    )
    assert result.builds == () and result.rollouts == ()
    assert [p.subject for p in result.problems] == ["images.web"]
    assert result.problems[0].message.startswith(f"web/.dockerignore at {NEW[:12]}: line 2:")


def test_unknown_names_are_problems() -> None:
    """Forcing an unknown image or selecting an unknown service is reported, not ignored."""
    result = _run(Case("unknown", _app(), frozenset(), force=("nope",), only=("ghost",)))
    assert [(p.subject, p.message) for p in result.problems] == [
        ("images.nope", "unknown image: cannot build it"),
        ("services.ghost", "unknown service: cannot roll it out"),
    ]


def test_spec_hashes_ignore_placement_only() -> None:
    """hosts, strategy and max_parallel leave the service hash alone; env_file content does not."""
    base = _config(_app(svc_api='env_file = "a.env"')).services["api"]
    moved = msgspec.structs.replace(base, hosts=["h2"], max_parallel=4)
    assert service_spec_hash(base, "X=1") == service_spec_hash(moved, "X=1")
    assert service_spec_hash(base, "X=1") != service_spec_hash(base, "X=2")
    web = _config(_app()).images["web"]
    assert image_spec_hash(web) != image_spec_hash(msgspec.structs.replace(web, watch=["x/"]))


def test_health_monitor_counts_in_the_service_hash_only_away_from_its_default() -> None:
    """Changing `monitor` rolls a service out like any health key, while a service that does
    not set it keeps the hash it had before the key existed (upgrading restarts nothing)."""

    def svc(**health: object) -> ServiceSection:
        return decode(
            ServiceSection,
            {"image": "web", "hosts": ["h"], "health": {"http": "/health", **health}},
        )

    before_monitor = "6c782d6f647cfa6ac40168a56adada406c70e181c0ec4bc795d81159c1703e0e"
    assert service_spec_hash(svc()) == service_spec_hash(svc(monitor="5s")) == before_monitor
    assert service_spec_hash(svc(monitor="1s")) != before_monitor
    assert service_spec_hash(svc(timeout="5s")) != before_monitor


def test_image_inputs_changed_lists_only_inputs() -> None:
    """image_inputs_changed keeps the context's files, the Dockerfile and watched paths, sorted."""
    web = _config(_app(web='watch = ["shared/"]')).images["web"]
    paths = ["api/main.py", "web/b.js", "shared/u.py", "web/a.js", "webx/y"]
    assert image_inputs_changed(web, paths, None) == ["shared/u.py", "web/a.js", "web/b.js"]
