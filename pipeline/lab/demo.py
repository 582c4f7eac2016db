"""`pipeline demo`: the main job on the bundled example, end to end, on a lab of real hosts.

Brings up the lab, creates the sample app's repository where the example config points, runs
a pass (the app is built, pushed and served on every host), then commits a change and runs
again, so a newcomer sees a change deployed. Safe to run again: it reuses what exists.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from pipeline.config.load import LoadedConfig
from pipeline.config.model import parse_port
from pipeline.deploy.connections import Connections
from pipeline.deploy.runner import Runner
from pipeline.lab.manage import lab_up
from pipeline.lab.sample_app import write_sample_app
from pipeline.lab.workrepo import WorkRepo
from pipeline.state.database import open_state


def prepare_repo(bare: Path, context: str) -> WorkRepo:
    """The bare repo and a working clone beside it, with the sample app committed once."""
    repo = WorkRepo(bare.parent, bare=bare, work=bare.with_suffix(".work"))
    if not (repo.work / context / "Dockerfile").exists():
        write_sample_app(repo.work, context, "hello from pipeline: v1\n")
        repo.commit_push("sample app v1")
    return repo


def config_subnet(loaded: LoadedConfig) -> str:
    """The lab subnet the config's hosts live on: the /24 of its registry's (else its first
    host's) IPv4 address, e.g. "10.88.110.0/24" for `10.88.110.1:5000`; the lab's default
    ("10.88.0.0/24") when the config names no IPv4 address. So a demo of a config made for a
    lab on another subnet brings up (or reuses) that lab instead of replacing it."""
    cfg = loaded.model
    candidates: list[str] = [cfg.registry.address] if cfg.registry else []
    candidates += [h.docker for h in cfg.hosts.values()]
    for text in candidates:
        host = urlsplit(text if "//" in text else f"//{text}").hostname or ""
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            continue
        return str(ipaddress.IPv4Network(f"{address}/24", strict=False))
    return "10.88.0.0/24"


def run_demo(loaded: LoadedConfig, lab_dir: Path, say: Callable[[str], None]) -> bool:
    """The whole demo; returns whether both passes succeeded and the change is served."""
    cfg = loaded.model
    say(f"== bringing up the lab in {lab_dir} (real Docker hosts in network namespaces)")
    lab = lab_up(lab_dir, hosts=len(cfg.hosts), subnet=config_subnet(loaded))
    lab_hosts = {h.docker_url for h in lab.hosts}
    missing = [n for n, h in cfg.hosts.items() if h.docker not in lab_hosts]
    if missing or (cfg.registry and cfg.registry.address != lab.registry):
        say(f"the lab's tables differ from {loaded.path.name}; paste these:\n{lab.toml}")
        return False
    repo_name, repo = next(iter(cfg.repos.items()))
    image = next(i for i in cfg.images.values() if i.repo == repo_name)
    git_repo = prepare_repo(Path(repo.url.removeprefix("file://")), image.context)
    work = git_repo.work
    say(f"== the sample app's repository: {repo.url} (working clone: {work})")
    ok = _pass(loaded, say, "first pass: build, push, deploy")
    page = work / image.context / "www" / "index.html"
    version = int(time.time())
    page.write_text(f"hello from pipeline: changed at {version}\n")
    sha = git_repo.commit_push(f"change the page ({version})")
    say(f"== committed a change to {page.relative_to(work)} ({sha[:12]}) and pushed it")
    ok = _pass(loaded, say, "second pass: only what changed is rebuilt and rolled out") and ok
    served = _show(loaded, lambda _line: None)
    say(
        "== next: `pipeline status -c pipeline.example.toml`, `pipeline history -c ...`, "
        f"`pipeline lab down --dir {lab_dir}`"
    )
    return ok and all(f"changed at {version}" in body for body in served)


def _pass(loaded: LoadedConfig, say: Callable[[str], None], title: str) -> bool:
    say(f"== {title}")
    connections = Connections(loaded)
    runner = Runner(loaded, open_state(loaded), connections, report=lambda line: say(f"   {line}"))
    try:
        result = runner.run_pass(trigger="demo")
    finally:
        connections.close()
    for error in result.errors:
        say(f"   error: {error}")
    _show(loaded, say)
    return result.ok


def _show(loaded: LoadedConfig, say: Callable[[str], None]) -> list[str]:
    bodies = []
    for name, svc in loaded.model.services.items():
        port = parse_port(svc.ports[0]).host_port if svc.ports else None
        for host in svc.hosts:
            if port is None:
                continue
            url = f"http://{loaded.model.hosts[host].reach_address}:{port}/"
            try:
                body = httpx.get(url, timeout=5).text.strip()
            except httpx.HTTPError as exc:
                body = f"(no answer: {exc})"
            bodies.append(body)
            say(f"   {name} on {host}: {url} -> {body}")
    return bodies
