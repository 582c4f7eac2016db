"""Zero-downtime deploys through each host's `pipeline-proxy`: real lab hosts, registry, Caddy."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from deploy_helpers import Project, registry_blocked
from serve_helpers import free_port, start_serve

from pipeline.deploy.operations import rollback_service
from pipeline.lab.registry import make_certs
from pipeline.lab.sample_app import write_sample_app

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SLOW_CGI = (
    '#!/bin/busybox sh\n/bin/busybox sleep 5\necho "Content-Type: text/plain"\necho\n'
    "echo slow done\n"
)
BROKEN_CGI = (
    '#!/bin/busybox sh\necho "Status: 500 Internal Server Error"\n'
    'echo "Content-Type: text/plain"\necho\necho broken\n'
)


def _proxied(project: Project, more: str = "", drain: str = "8s", tables: str = "") -> str:
    """Make `web` of the project a proxied service on both hosts (`more`: more keys of its
    proxy table, `tables`: more tables of the config); return its Host name."""
    if project.lab.proxy_image is None:
        pytest.skip("the lab has no proxy image (apt-get install caddy)")
    name = f"{project.web}.test"
    project.extra = (
        f'\n[proxy]\nimage = "{project.lab.proxy_image}"\n'
        'http_port = 80\nhttps_port = 443\nnetwork = "pipeline"\n' + tables
    )
    project.write_config(
        web_ports="",
        web=f'\n[services.{project.web}.proxy]\nhosts = ["{name}"]\nport = 8080\n'
        + f'drain = "{drain}"\n'
        + more,
    )
    return name


def _states(project: Project) -> list[dict[str, str]]:
    """Per lab host: each container of `web` by the revision it runs -> its Docker state."""
    out = []
    for h in project.lab.hosts[:2]:
        client = docker.DockerClient(base_url=h.docker_url)
        try:
            found = client.containers.list(
                all=True, filters={"label": f"dev.pipeline.service={project.web}"}
            )
            out.append({c.labels["dev.pipeline.revision"]: c.status for c in found})
        finally:
            client.close()
    return out


def _commit_web(project: Project, content: str, *, broken: bool = False) -> str:
    ctx = write_sample_app(project.remote.work, "web", content)
    (ctx / "www" / "cgi-bin").mkdir(exist_ok=True)
    (ctx / "www" / "cgi-bin" / "slow").write_text(SLOW_CGI)
    (ctx / "www" / "cgi-bin" / "slow").chmod(0o755)
    if broken:  # /health answers 404, / answers 500
        (ctx / "www" / "health").unlink()
        (ctx / "www" / "index.html").unlink()
        (ctx / "www" / "cgi-bin" / "index.cgi").write_text(BROKEN_CGI)
        (ctx / "www" / "cgi-bin" / "index.cgi").chmod(0o755)
    else:
        (ctx / "www" / "cgi-bin" / "index.cgi").unlink(missing_ok=True)
    return project.push(content)


def _get(
    project: Project, i: int, host: str, path: str = "/", timeout: float = 5
) -> httpx.Response:
    return httpx.get(f"http://{project.lab.hosts[i].address}{path}", headers={"Host": host},
                     timeout=timeout)  # fmt: skip


@contextmanager
def _load(project: Project, host: str) -> Iterator[Counter[str]]:
    """Requests sent to both hosts' proxies in a closed loop while the block runs; counts each
    answer's status and body (or the connection error)."""
    seen: Counter[str] = Counter()
    stop = threading.Event()

    def loop() -> None:
        # A new connection per request, as bench_zero_downtime sends them. A keep-alive
        # connection that Caddy closes at a reload can race a request sent on it (seen: 2 of
        # ~2,900 failed); that gap is open (issue 11), so this test does not claim it.
        no_keepalive = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=5, limits=no_keepalive) as client:
            while not stop.is_set():
                for h in project.lab.hosts:
                    try:
                        r = client.get(f"http://{h.address}/", headers={"Host": host})
                        seen[f"{r.status_code} {r.text.strip()}"] += 1
                    except httpx.HTTPError as exc:
                        seen[f"error {type(exc).__name__}"] += 1

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        yield seen
    finally:
        stop.set()
        worker.join()


def test_deploys_switch_under_load_without_a_failed_request(project: Project) -> None:
    """Through each host's proxy, by its Host header: a deploy moves traffic only once the new
    container is healthy, a 5 s request begun before the switch completes with 200, and a
    revision whose /health fails and whose / answers 500 is rolled back with no client ever
    receiving a 500 or a connection error; `proxy status --json` names each route's container."""
    host = _proxied(project)
    project.initial_commit()
    _commit_web(project, "web v1")
    assert project.run().ok
    assert [_get(project, i, host).text for i in (0, 1)] == ["web v1", "web v1"]

    with _load(project, host) as seen:
        slow: dict[str, Any] = {}
        started = threading.Event()

        def slow_request() -> None:
            started.set()
            r = _get(project, 0, host, "/cgi-bin/slow", timeout=20)
            slow.update(status=r.status_code, text=r.text)

        sha2 = _commit_web(project, "web v2")
        runner = project.runner()
        try:
            waiter = threading.Thread(target=slow_request)
            waiter.start()
            started.wait()
            time.sleep(0.3)  # in flight on v1 before the pass even builds v2
            assert runner.run_pass().ok
            waiter.join()
            _commit_web(project, "web v3 broken", broken=True)
            failed = runner.run_pass()
        finally:
            runner.connections.close()
    assert slow == {"status": 200, "text": "slow done\n"}
    assert not failed.ok and failed.rollouts[0].failure_kind == "unhealthy", failed.errors
    # the reason names the container checked and how it was reached, not only a proxy address
    assert (
        "GET /health of " in failed.errors[0]
        and "through pipeline-proxy on http://" in (failed.errors[0])
    ), failed.errors
    assert [_get(project, i, host).text for i in (0, 1)] == ["web v2", "web v2"]
    bad = {k: n for k, n in seen.items() if not k.startswith("200 ")}
    assert bad == {}, seen
    assert set(seen) <= {"200 web v1", "200 web v2"}, seen

    done = project.cli("proxy", "status", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["host"]: r for r in json.loads(done.stdout)}
    assert set(rows) == set(project.host_names)
    for row in rows.values():
        route = next(r for r in row["routes"] if r["service"] == project.web)
        assert route["hosts"] == [host] and route["container_state"] == "running"
        assert route["revision"] == sha2 and route["container"].startswith(project.web)


def test_a_request_still_in_flight_after_the_drain_is_ended_not_frozen(project: Project) -> None:
    """A 25 s request still in flight when a 1 s drain ends is not frozen in a paused container
    (its client would wait for ever): that container is stopped instead, its app ends the
    request, the client gets an answer, and the run says so (and that it drained); a host with
    none is paused."""
    host = _proxied(project, drain="1s")
    project.initial_commit()
    ctx = project.remote.work / "web" / "www" / "cgi-bin"
    _commit_web(project, "web v1")
    # Longer than the next pass's build and switch: still in flight when the drain ends.
    (ctx / "slower").write_text(SLOW_CGI.replace("sleep 5", "sleep 25"))
    (ctx / "slower").chmod(0o755)
    v1 = project.push("a slower page")
    assert project.run().ok
    answered: dict[str, Any] = {}
    started = threading.Event()

    def slow_request() -> None:
        started.set()
        try:
            r = _get(project, 0, host, "/cgi-bin/slower", timeout=40)
            answered["status"] = r.status_code
        except httpx.HTTPError as exc:
            answered["status"] = type(exc).__name__

    v2 = _commit_web(project, "web v2")
    waiter = threading.Thread(target=slow_request)
    waiter.start()
    started.wait()
    time.sleep(0.3)  # in flight on v1 before the pass builds v2
    runner = project.runner()
    lines: list[str] = []
    runner.report = lines.append
    try:
        result = runner.run_pass()
    finally:
        runner.connections.close()
    waiter.join(timeout=45)
    assert result.ok, result.errors
    # the wait is said, not silent: lab-1's old container had the request in flight
    assert any(f"{project.host_names[0]}: draining " in ln and "1 request(s) in flight" in ln
               for ln in lines), lines  # fmt: skip
    assert answered.get("status") not in (None, "ReadTimeout"), answered  # an answer, not a hang
    assert _states(project) == [{v1: "exited", v2: "running"}, {v1: "paused", v2: "running"}]
    steps = project.runner().state.steps(result.run_id)
    assert any("still in flight after the drain: stopped" in (s.detail or "") for s in steps)


@pytest.mark.parametrize("retain", ["paused", "stopped"])
def test_rollback_is_a_switch_with_the_registry_down(project: Project, retain: str) -> None:
    """The previous container is drained, then kept paused (the default) or stopped (`retain`);
    `pipeline rollback` of the proxied service resumes it and switches back to it, every host
    in one batch, with no host able to reach the registry; the container it left is then kept
    the same way (and, paused, is paused again when a rollback to it fails its check)."""
    host = _proxied(project, "" if retain == "paused" else f'retain = "{retain}"\n')
    project.initial_commit()
    v1 = _commit_web(project, "web v1")
    assert project.run().ok
    v2 = _commit_web(project, "web v2")
    assert project.run().ok
    assert [_get(project, i, host).text for i in (0, 1)] == ["web v2", "web v2"]
    kept = "paused" if retain == "paused" else "exited"
    assert _states(project) == [{v1: kept, v2: "running"}] * 2
    table = project.cli("proxy", "status").stdout.splitlines()
    assert table[0].split()[-1] == "STANDBY", table
    # each host's route: serving v2, v1's kept container on standby
    mine = [ln.split() for ln in table[1:] if project.web in ln.split()]
    assert [row[-1].split("-")[1] for row in mine] == [v1[:12]] * 2, table
    runner = project.runner()
    try:
        with registry_blocked(project.lab, 0), registry_blocked(project.lab, 1):
            began = time.monotonic()
            outcome = rollback_service(runner, project.web)
            took = time.monotonic() - began
    finally:
        runner.connections.close()
    assert outcome.ok, outcome.error
    assert [_get(project, i, host).text for i in (0, 1)] == ["web v1", "web v1"]
    assert _states(project) == [{v1: "running", v2: kept}] * 2
    steps = runner.state.steps(runner.state.runs(limit=1)[0].id)
    switch = {}  # host -> seconds from its first step to its route moved back
    spans = []
    for h in project.host_names:
        mine = [s for s in steps if s.host == h and s.kind != "retire"]
        routed = next(s for s in mine if s.kind == "route")
        assert routed.finished_at is not None
        spans.append((min(s.started_at for s in mine), routed.finished_at))
        switch[h] = (routed.finished_at - spans[-1][0]).total_seconds()
    # One batch: each host began before the other's route was switched back.
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    print(f"rollback: {took:.2f}s in all; per host until switched: {switch}")
    # The time per host is measured by bench/bench_zero_downtime.py (BENCHMARKS.md), not
    # asserted here; what this test holds is that the switch back works with no registry.
    if retain == "paused":
        _kept_fails_its_check_again(project, host, v1, v2)


def test_rollback_with_serve_running_is_done_by_serve(project: Project, tmp_path: Path) -> None:
    """With `pipeline serve` of the config running, `pipeline rollback` hands the rollback to
    it (serve.json) and shows its progress: the previous revision is served on both hosts with
    the registry down, and history has the rollback; a rollout of another service that serve
    is in the middle of does not hold it up; `--no-serve` rolls back in the command's own
    process; a stopped service removes serve.json and the command works alone again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    host = _proxied(project, tables=f'\n[server]\nlisten = "127.0.0.1:{port}"\n')
    project.initial_commit()
    v1 = _commit_web(project, "web v1")
    assert project.run().ok
    v2 = _commit_web(project, "web v2")
    assert project.run().ok
    serve = start_serve(project.config, url, tmp_path / "serve.log", watch_repos=False)
    published = project.config.parent / "data" / "serve.json"
    try:
        assert published.exists()
        with registry_blocked(project.lab, 0), registry_blocked(project.lab, 1):
            done = project.cli("rollback", project.web)
        assert done.returncode == 0, done.stderr + serve.log()
        handed = f"{project.web}: rolling back in pipeline serve (pid {serve.proc.pid})"
        assert handed in done.stderr
        assert "proxy routes to" in done.stderr  # the service's progress lines, shown here
        assert [_get(project, i, host).text for i in (0, 1)] == ["web v1", "web v1"]
        assert "run.progress" in serve.log()  # the service did it, not the command
        history = json.loads(project.cli("history", project.web, "--json").stdout)
        assert (history[0]["kind"], history[0]["status"]) == ("rollback", "succeeded")
        assert history[0]["revision"] == v1

        # serve rolls out a revision of api whose check fails for 10 s (`timeout`) ...
        ctx = write_sample_app(project.remote.work, "api", "api v2")
        (ctx / "www" / "health").unlink()
        project.push("api v2, unhealthy")
        token = json.loads(published.read_text())["token"]
        queued = httpx.post(f"{url}/api/deploy/{project.api}", json={}, timeout=10,
                            headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert queued.status_code == 202, queued.text

        def api_release() -> str | None:
            rows = serve.get(f"/api/history?service={project.api}&limit=1")
            return str(rows[0]["status"]) if rows and rows[0]["kind"] == "deploy" else None

        deadline = time.monotonic() + 120
        while api_release() != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api_release() == "running", serve.log()
        # ... and a rollback of web handed to it meanwhile does not wait for that rollout.
        forward = project.cli("rollback", project.web, "--to", v2[:12])
        assert forward.returncode == 0 and handed in forward.stderr, forward.stderr
        assert api_release() == "running", "the rollback waited for api's rollout"
        assert [_get(project, i, host).text for i in (0, 1)] == ["web v2", "web v2"]

        alone = project.cli("rollback", project.web, "--to", v1[:12], "--no-serve")
        assert alone.returncode == 0, alone.stderr
        assert "in pipeline serve" not in alone.stderr
        assert [_get(project, i, host).text for i in (0, 1)] == ["web v1", "web v1"]
    finally:
        serve.stop()
    assert not published.exists()
    again = project.cli("rollback", project.web, "--to", v2[:12])
    assert again.returncode == 0 and "in pipeline serve" not in again.stderr, again.stderr
    assert [_get(project, i, host).text for i in (0, 1)] == ["web v2", "web v2"]


def test_a_rollback_interrupted_while_the_old_containers_drain_is_kept_and_pinned(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C or SIGTERM once every host has switched back (here raised as the first old
    container starts draining) leaves no row running: the release is recorded succeeded (it is
    what every host serves), the service pinned to it (a pass must not roll the revision just
    left out again), and the run interrupted."""
    from pipeline.deploy.rollout import Rollout

    host = _proxied(project)
    project.initial_commit()
    v1 = _commit_web(project, "web v1")
    assert project.run().ok
    _commit_web(project, "web v2")
    assert project.run().ok

    def interrupted(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Rollout, "retire", interrupted)
    runner = project.runner()
    try:
        with pytest.raises(KeyboardInterrupt):
            rollback_service(runner, project.web)
        assert [_get(project, i, host).text for i in (0, 1)] == ["web v1", "web v1"]
        (release,) = runner.state.releases(project.web, 1)
        assert (release.kind, release.status, release.revision) == ("rollback", "succeeded", v1)
        assert runner.state.rollbacks.pins()[project.web].release_id == release.id
        run = runner.state.run(release.run_id)
        assert run is not None and run.status == "interrupted"
    finally:
        runner.connections.close()


def _kept_fails_its_check_again(project: Project, host: str, serving: str, kept: str) -> None:
    """A rollback to the kept (paused) container whose /health was removed meanwhile is undone:
    users stay on the serving container and the kept one is paused again, not left running."""
    for h in project.lab.hosts[:2]:
        client = docker.DockerClient(base_url=h.docker_url)
        try:
            (old,) = client.containers.list(
                filters={"label": [f"dev.pipeline.service={project.web}",
                                   f"dev.pipeline.revision={kept}"]})  # fmt: skip
            old.unpause()
            assert old.exec_run(["/bin/busybox", "rm", "/www/health"]).exit_code == 0
            old.pause()
        finally:
            client.close()
    runner = project.runner()
    try:
        outcome = rollback_service(runner, project.web, kept[:12])
    finally:
        runner.connections.close()
    assert not outcome.ok
    assert "404" in (outcome.error or ""), outcome.error
    assert [_get(project, i, host).text for i in (0, 1)] == ["web v1", "web v1"]
    assert _states(project) == [{serving: "running", kept: "paused"}] * 2


def test_a_proxy_removed_by_hand_comes_back_with_every_services_route(project: Project) -> None:
    """`docker rm -f pipeline-proxy` takes the route table inside it along; the next rollout on
    that host makes a proxy that serves every proxied service's recorded container again (api,
    not rolled out, included), not a 404 until each service's next deploy."""
    web_host = _proxied(project)
    api_host = f"{project.api}.test"
    text = project.config.read_text().replace(f'ports = ["{project.api_port}:8080"]\n', "")
    project.config.write_text(
        text + f'\n[services.{project.api}.proxy]\nhosts = ["{api_host}"]\nport = 8080\n'
    )
    project.initial_commit()
    assert project.run().ok
    assert [_get(project, 0, h).text for h in (web_host, api_host)] == ["web v1", "api v1"]
    client = docker.DockerClient(base_url=project.lab.hosts[0].docker_url)
    try:
        client.containers.get("pipeline-proxy").remove(force=True)
    finally:
        client.close()
    _commit_web(project, "web v2")
    result = project.run()
    assert result.ok, result.errors
    assert [r.service for r in result.rollouts] == [project.web]
    for i in (0, 1):
        assert [_get(project, i, h).text for h in (web_host, api_host)] == ["web v2", "api v1"]


def test_a_port_the_image_does_not_expose_fails_before_anything_starts(project: Project) -> None:
    """`port = 9090` on an image that exposes 8080 fails the rollout with the config's file:line
    and key before any container of the service is made on any host."""
    _proxied(project)
    project.config.write_text(project.config.read_text().replace("port = 8080\n", "port = 9090\n"))
    project.initial_commit()
    result = project.run()
    assert not result.ok
    (error,) = [e for e in result.errors if "9090" in e]
    line = project.config.read_text().splitlines().index("port = 9090") + 1
    assert re.search(
        rf"pipeline\.toml:{line}: services\.{project.web}\.proxy\.port: 9090 is not a port the "
        r"image exposes \(EXPOSE: 8080/tcp\)", error), error  # fmt: skip
    assert _states(project) == [{}, {}]


@contextmanager
def _reload_broken(project: Project, index: int) -> Iterator[None]:
    """`caddy reload` fails on one host's proxy (its binary replaced by a file that cannot run)
    while the running Caddy keeps serving the routes it has; put back afterwards, even when
    the test fails."""
    client = docker.DockerClient(base_url=project.lab.hosts[index].docker_url)
    proxy = client.containers.get("pipeline-proxy")
    stream, _stat = proxy.get_archive("/usr/bin/caddy")
    original = b"".join(stream)
    broken = io.BytesIO()
    with tarfile.open(fileobj=broken, mode="w") as tar:
        info = tarfile.TarInfo("caddy")
        info.size, info.mode = 3, 0o644
        tar.addfile(info, io.BytesIO(b"no\n"))
    try:
        assert proxy.put_archive("/usr/bin", broken.getvalue())
        yield
    finally:
        proxy.put_archive("/usr/bin", original)
        client.close()


def test_a_proxy_that_cannot_reload_fails_its_host_and_rolls_the_service_back(
    project: Project,
) -> None:
    """A host whose proxy cannot be reloaded fails like a failed health check: the release is
    rolled back on every host with the reason naming that host and its proxy, nothing is left
    to put back, and no client sees a failed request or a half-switched route."""
    host = _proxied(project)
    project.initial_commit()
    sha1 = _commit_web(project, "web v1")
    assert project.run().ok
    _commit_web(project, "web v2")
    with _load(project, host) as seen, _reload_broken(project, 1):
        failed = project.run()
    assert not failed.ok
    error = " ".join(failed.errors)
    assert f"host {project.lab.hosts[1].name}:" in error and "its proxy could not" in error, error
    assert "not put back" not in error, error
    assert [_get(project, i, host).text for i in (0, 1)] == ["web v1", "web v1"]
    # lab-1 served v2 until the whole service was rolled back; nobody saw anything but a 200
    assert set(seen) <= {"200 web v1", "200 web v2"}, seen
    status = json.loads(project.cli("proxy", "status", "--json").stdout)
    served = {r["host"]: [x["revision"] for x in r["routes"] if x["service"] == project.web]
              for r in status}  # fmt: skip
    assert served == {h: [sha1] for h in project.host_names}, served


def _https_get(address: str, name: str, root_pem: str) -> tuple[str, str]:
    """GET / over TLS from `address`:443 with SNI and Host `name`, verifying the certificate
    against `root_pem`; returns (the status line, the body)."""
    context = ssl.create_default_context(cadata=root_pem)
    with (
        socket.create_connection((address, 443), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


def test_tls_internal_serves_https_with_the_proxys_own_ca(project: Project) -> None:
    """`tls = "internal"` serves the service over HTTPS on the proxy's https_port with a
    certificate for its host name that Caddy's own CA on that host signed."""
    host = _proxied(project)
    web = f'\n[services.{project.web}.proxy]\nhosts = ["{host}"]\nport = 8080\ntls = "internal"\n'
    project.write_config(web_ports="", web=web)
    project.initial_commit()
    _commit_web(project, "web over tls")
    assert project.run().ok
    for h in project.lab.hosts:
        client = docker.DockerClient(base_url=h.docker_url)
        try:
            proxy = client.containers.get("pipeline-proxy")
            path = "/data/caddy/pki/authorities/local/root.crt"
            for _ in range(50):  # Caddy writes its CA once the HTTPS server is provisioned
                found = _read(proxy, path)
                if found:
                    break
                time.sleep(0.2)
        finally:
            client.close()
        assert found, f"no local CA on {h.name}"
        assert _https_get(h.address, host, found) == ("HTTP/1.1 200 OK", "web over tls")


def _read(container: Any, path: str) -> str | None:
    """A file of a container, or None when it has none yet."""
    try:
        stream, _stat = container.get_archive(path)
    except docker.errors.NotFound:
        return None
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.getmembers()[0]
        handle = tar.extractfile(member)
        return handle.read().decode() if handle else None


@contextmanager
def _pebble(work: Path, gateway: str, answer: str) -> Iterator[tuple[str, Path]]:
    """Pebble, a real ACME CA with real validation, on the lab's bridge address `gateway`:
    its directory on :14000 served with a certificate of a CA made here, its challenges
    checked on ports 80 (HTTP-01) and 443 (TLS-ALPN-01) of the address that
    pebble-challtestsrv's DNS gives every name (`answer`). Yields (the directory's URL, the
    file of the CA its HTTPS chains to); both processes are stopped afterwards, even on
    failure."""
    if shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None:
        pytest.skip("pebble is not installed (apt-get install pebble; .ci/setup does)")
    make_certs(work / "tls", gateway, "pebble")
    (work / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"{gateway}:14000", "managementListenAddress": f"{gateway}:15000",
        "certificate": str(work / "tls" / "server.crt"),
        "privateKey": str(work / "tls" / "server.key"),
        "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "",
        "externalAccountBindingRequired": False}}))  # fmt: skip
    dns = f"{gateway}:8053"
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    started: list[subprocess.Popen[bytes]] = []
    try:
        for argv, log in (
            (["pebble-challtestsrv", "-defaultIPv4", answer, "-defaultIPv6", "", "-dns01", dns,
              "-http01", "", "-https01", "", "-tlsalpn01", "",
              "-management", f"{gateway}:8055"], "challtestsrv.log"),
            (["pebble", "-config", str(work / "pebble.json"), "-dnsserver", dns], "pebble.log"),
        ):  # fmt: skip
            with (work / log).open("wb") as out:
                started.append(subprocess.Popen(argv, stdout=out, stderr=out, env=env))
        directory = f"https://{gateway}:14000/dir"
        trust = ssl.create_default_context(cafile=work / "tls" / "ca.crt")
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(directory, verify=trust, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (work / "pebble.log").read_text()
            time.sleep(0.1)
        yield directory, work / "tls" / "ca.crt"
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_tls_acme_gets_a_certificate_from_a_real_acme_ca(project: Project) -> None:
    """`tls = "acme"` with `[proxy] acme_ca`/`acme_ca_root`/`acme_email` pointing at an ACME CA
    (pebble, validating challenges for real on the host's ports 80/443) serves the service over
    HTTPS with a certificate for its name that chains to that CA's issuing root; a proxy made
    anew later serves the same certificate, the CA gone (Caddy's /data is kept in a volume)."""
    if project.lab.proxy_image is None:
        pytest.skip("the lab has no proxy image (apt-get install caddy)")
    lab_host = project.lab.hosts[0]
    gateway = project.lab.registry.rsplit(":", 1)[0]
    name = f"{project.web}.test"
    work = project.root / "pebble"
    work.mkdir()
    try:
        with _pebble(work, gateway, lab_host.address) as (directory, ca_root):
            shutil.copy(ca_root, project.root / "acme-root.pem")  # relative to the config
            project.host_names = [lab_host.name]
            project.extra = (
                f'\n[proxy]\nimage = "{project.lab.proxy_image}"\nhttp_port = 80\n'
                f'https_port = 443\nnetwork = "pipeline"\nacme_ca = "{directory}"\n'
                'acme_ca_root = "acme-root.pem"\nacme_email = "ops@example.com"\n'
            )
            project.write_config(
                web_ports="",
                web=f'\n[services.{project.web}.proxy]\nhosts = ["{name}"]\nport = 8080\n'
                'tls = "acme"\n',
            )
            project.initial_commit()
            _commit_web(project, "web over acme")
            result = project.run()
            assert result.ok, result.errors
            trust = ssl.create_default_context(cafile=ca_root)
            root = httpx.get(f"https://{gateway}:15000/roots/0", verify=trust, timeout=5).text
            # Caddy orders the certificate once the config with the route loads
            got, certificate = _https_get_when_served(lab_host.address, name, root, work)
            assert got == ("HTTP/1.1 200 OK", "web over acme")
            logs = _proxy_logs(lab_host.docker_url)
            assert "served key authentication" in logs, logs[-3000:]  # pebble really asked
        _remove_proxy(lab_host.docker_url, volume=False)
        _commit_web(project, "web v2")
        result = project.run()
        assert result.ok, result.errors
        again = _https_get_when_served(lab_host.address, name, root, work)
        assert again == (("HTTP/1.1 200 OK", "web v2"), certificate)
    finally:
        # The acme route and its issuer leave with this proxy: later tests make their own.
        _remove_proxy(lab_host.docker_url, volume=True)


def _https_get_when_served(
    address: str, name: str, root_pem: str, work: Path
) -> tuple[tuple[str, str], bytes]:
    """`_https_get` retried until the proxy serves a certificate for `name` chaining to
    `root_pem` (at most 30 s); also returns that certificate (DER)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return _https_get(address, name, root_pem), _certificate(address, name, root_pem)
        except (OSError, ssl.SSLError):
            log = work / "pebble.log"
            assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else ""
            time.sleep(0.3)


def _certificate(address: str, name: str, root_pem: str) -> bytes:
    """The certificate (DER) `address`:443 serves for SNI `name`, verified against `root_pem`."""
    context = ssl.create_default_context(cadata=root_pem)
    with (
        socket.create_connection((address, 443), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        return tls.getpeercert(binary_form=True) or b""


def _proxy_logs(docker_url: str) -> str:
    client = docker.DockerClient(base_url=docker_url)
    try:
        return bytes(client.containers.get("pipeline-proxy").logs()).decode(errors="replace")
    finally:
        client.close()


def _remove_proxy(docker_url: str, *, volume: bool) -> None:
    """Remove the host's proxy container (and, with `volume`, its data volume); gone is fine."""
    client = docker.DockerClient(base_url=docker_url)
    try:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get("pipeline-proxy").remove(force=True)
        if volume:
            with contextlib.suppress(docker.errors.NotFound):
                client.volumes.get("pipeline-proxy-data").remove(force=True)
    finally:
        client.close()
