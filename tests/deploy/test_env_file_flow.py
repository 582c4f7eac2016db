"""A service's env_file on the lab: a missing one fails that service alone, with its file, line
and key; a Compose-style one reaches the containers as Compose would give it."""

from __future__ import annotations

import docker
import pytest
from deploy_helpers import Project

from pipeline.state.store import State

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7flow9envfile\n"
    "x9Tq3vZ0b8Yw1Rk2Lm4Np6Qs8Tu0Vw2Xy4Za6Bc8De0Fg2Hi4Jk6Lm8No0Pq2Rs\n"
    "-----END PRIVATE KEY-----"
)
COMPOSE_STYLE = f"""# written for docker compose
GREETING="hello envfile world"
export MODE='literal ${{HOME}}'
TLS_KEY="{PEM}"
PLAIN=plain-envfile-value # a comment
"""


def _web_env(project: Project) -> list[list[str]]:
    """`docker inspect` Config.Env of web's running container on each host."""
    envs = []
    for host in project.lab.hosts:
        client = docker.DockerClient(base_url=host.docker_url)
        try:
            (container,) = client.containers.list(
                filters={"label": f"dev.pipeline.service={project.web}"}
            )
            envs.append(client.api.inspect_container(container.id)["Config"]["Env"])
        finally:
            client.close()
    return envs


def test_missing_env_file_fails_only_its_service_then_compose_style_reaches_containers(
    project: Project,
) -> None:
    """A missing env_file fails web's plan in `plan` and `run` with FILE:LINE and key (exit 1,
    no traceback) while api deploys and no run is left running; written Compose-style, it
    reaches web's containers as Compose gives it: quotes removed, the PEM key whole."""
    project.write_config(web='env_file = "web.env"')
    project.initial_commit()
    line = project.config.read_text().splitlines().index('env_file = "web.env"') + 1
    expected = (
        f"{project.config}:{line}: services.{project.web}.env_file: cannot read "
        f"{project.root / 'web.env'}: No such file or directory"
    )

    plan = project.cli("plan")
    assert plan.returncode == 1, plan.stdout + plan.stderr
    assert f"error   {expected}" in plan.stdout.splitlines(), plan.stdout
    assert f"rollout {project.api} (after its build)" in plan.stdout, plan.stdout
    run = project.cli("run")
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"error: {expected}" in run.stderr.splitlines(), run.stderr
    assert "Traceback" not in plan.stderr + run.stderr
    assert project.get(0, project.api_port) == "api v1"
    assert project.get(1, project.api_port) == "api v1"
    assert project.containers(project.web) == {h.name: [] for h in project.lab.hosts}
    runs = State.in_dir(project.root / "data").runs(10)
    assert [r.status for r in runs] == ["failed"], runs

    (project.root / "web.env").write_text(COMPOSE_STYLE)
    validate = project.cli("validate")
    assert validate.returncode == 0, validate.stdout + validate.stderr
    again = project.cli("run")
    assert again.returncode == 0, again.stdout + again.stderr
    for env in _web_env(project):
        assert "GREETING=hello envfile world" in env, env
        assert "MODE=literal ${HOME}" in env, env
        assert f"TLS_KEY={PEM}" in env, env
        assert "PLAIN=plain-envfile-value" in env, env
        names = [e.partition("=")[0] for e in env]
        assert not any(n.startswith(("MIIE", "x9Tq", "-----")) for n in names), names
    assert PEM.splitlines()[1] not in again.stdout + again.stderr
