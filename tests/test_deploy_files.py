"""The deployment files in ``deploy/`` parse, validate and say what the node relies on.

Nothing here needs the network: the systemd unit is parsed and, where ``systemd-analyze`` is
installed, verified; the compose file is parsed and, where Docker Compose is installed,
rendered with ``config``; the Dockerfile is read line by line (a full ``docker build`` needs the
registries); the container's config.toml loads with the environment overrides compose sets,
and the image's HEALTHCHECK command is run against a real web stage.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO, free_port, wait_port

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "dicom-node.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
CONTAINER_CONFIG = DEPLOY / "docker" / "config.toml"
STAGES = ("listen", "schedule", "work", "dispatch", "web")
DEFAULT_STOP_GRACE_SECONDS = 120  # [worker] stop_grace_seconds: a running inference may finish


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read(UNIT)
    return cp


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)\s*(s|min|m)?", value.strip())
    assert m, f"unexpected duration {value!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def _parses_as_cli(argv: list[str]) -> None:
    from dicom_node.cli import build_parser

    args = build_parser().parse_args(argv)
    assert getattr(args, "func", None) is not None, argv


def test_systemd_unit_has_the_keys_the_node_relies_on():
    unit = _unit()
    svc = unit["Service"]
    assert svc["Type"] in ("simple", "notify")
    assert svc["User"] == "dicom-node" and svc["Group"] == "dicom-node"
    assert svc["KillMode"] in ("mixed", "control-group")  # stages die with the service
    assert _seconds(svc["TimeoutStopSec"]) >= DEFAULT_STOP_GRACE_SECONDS + 30
    assert svc["Restart"] == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "PrivateDevices": "yes", "RestrictSUIDSGID": "yes"}.items():
        assert svc[key] == value, key
    assert "/var/lib/dicom-node" in svc["ReadWritePaths"].split()
    assert svc["StateDirectory"] == "dicom-node" and svc["WorkingDirectory"] == "/var/lib/dicom-node"
    exec_start = shlex.split(svc["ExecStart"])
    assert exec_start[0].endswith("/dicom-node") and exec_start[1] == "serve"
    _parses_as_cli(exec_start[1:])
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    sysusers = (DEPLOY / "systemd" / "dicom-node.sysusers").read_text()
    assert re.search(r"^u dicom-node .* /var/lib/dicom-node", sysusers, re.M)


def test_systemd_analyze_verifies_the_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at this Python for the check.
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m dicom_node.cli", UNIT.read_text(), flags=re.M)
    copy = tmp_path / "dicom-node.service"
    copy.write_text(text)
    r = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "dicom-node.service" in line]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


def _compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_postgres_and_each_stage_separately():
    doc = _compose()
    services = doc["services"]
    assert set(STAGES) | {"postgres"} <= set(services)
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:") and "pg_isready" in " ".join(pg["healthcheck"]["test"])
    images = set()
    for name in (*STAGES, "migrate"):
        svc = services[name]
        images.add(svc["image"])
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (COMPOSE.parent / svc["build"]["context"]).resolve() == REPO
        _parses_as_cli(svc["command"])
        assert svc["environment"]["DICOM_NODE_DATABASE__URL"].startswith("postgresql://")
        assert "@postgres:5432/" in svc["environment"]["DICOM_NODE_DATABASE__URL"]
        assert "dicom-node-data:/var/lib/dicom-node" in svc["volumes"]  # one shared data_dir
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        if name != "migrate":
            assert svc["command"][0] == name
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert len(images) == 1  # one image for every stage
    assert _seconds(services["work"]["stop_grace_period"]) >= DEFAULT_STOP_GRACE_SECONDS
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])
    assert {"dicom-node-data", "postgres-data"} <= set(doc["volumes"])


def test_compose_config_renders(tmp_path):
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            continue
        r = subprocess.run([*cmd, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "POSTGRES_PASSWORD": "from-env"})
        assert r.returncode == 0, r.stderr
        assert "postgresql://dicomnode:from-env@postgres:5432/dicomnode" in r.stdout
        for stage in STAGES:
            assert re.search(rf"^  {stage}:$", r.stdout, re.M), stage
        return
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


def _dockerfile() -> list[str]:
    """Instructions with continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            out.append(current.strip())
            current = ""
    return out


def test_dockerfile_builds_a_non_root_cpu_image_with_a_healthcheck():
    lines = _dockerfile()
    assert lines[0] == "FROM python:3.11-slim-bookworm"
    torch = [x for x in lines if "torch==" in x]
    assert torch and "--index-url https://download.pytorch.org/whl/cpu" in torch[0]
    pin = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"torch=={pin}" in torch[0] and pin == "2.13.0"
    assert any(x.startswith("RUN pip install .") for x in lines)
    users = [x.split()[1] for x in lines if x.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(x.startswith("VOLUME") and "/var/lib/dicom-node" in x for x in lines)
    health = [x for x in lines if x.startswith("HEALTHCHECK")]
    assert health and "/healthz" in health[0]
    assert any(x.startswith("ENTRYPOINT") and "dicom-node" in x for x in lines)
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for x in lines:
        if x.startswith("COPY "):
            for src in x.split()[1:-1]:
                assert (REPO / src).exists(), src
                assert any(p.lstrip("!").rstrip("/*") == src for p in ignore if p.startswith("!")), src


def test_container_config_loads_with_the_compose_environment(monkeypatch):
    from dicom_node.config import load_settings

    monkeypatch.setenv("DICOM_NODE_DATABASE__URL", "postgresql://dicomnode:pw@postgres:5432/dicomnode")
    settings = load_settings(CONTAINER_CONFIG)
    assert settings.database_url.startswith("postgresql://") and "@postgres:5432/" in settings.database_url
    assert settings.node.data_dir == Path("/var/lib/dicom-node")
    assert settings.node.host == "0.0.0.0" and settings.web.host == "0.0.0.0"


def test_the_image_healthcheck_command_passes_against_a_web_stage(tmp_path):
    """The HEALTHCHECK of the Dockerfile, run against ``dicom-node web`` with the container config."""
    port = free_port()
    health = next(x for x in _dockerfile() if x.startswith("HEALTHCHECK"))
    argv = __import__("json").loads(health[health.index("CMD") + 3:].strip())
    argv = [sys.executable if a == "python" else a.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for a in argv]
    # Only the web stage runs here: require no other stage's heartbeat (under `serve` all run).
    env = {**os.environ, "PYTHONPATH": str(REPO), "DICOM_NODE_NODE__DATA_DIR": str(tmp_path / "var"),
           "DICOM_NODE_NODE__REQUIRED_STAGES": "[]", "DICOM_NODE_NODE__MIN_FREE_DISK_MB": "1"}
    web = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "web", "--config", str(CONTAINER_CONFIG),
                            "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, timeout=120, proc=web)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        os.killpg(web.pid, 15)
        web.wait(30)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0  # and it fails when nothing answers
