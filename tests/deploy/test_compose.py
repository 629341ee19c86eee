"""deploy/ is tested like code: the compose file validates against the Compose Specification's
JSON schema (vendored: no docker on these machines), and every command a container, a k8s
manifest or a systemd unit runs is parsed by the project's real CLIs — a renamed option or a
removed command fails here, not at 3 a.m. in production."""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import click
import jsonschema_rs
import pytest
import yaml

from app.cli.processes import worker_argv
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SCHEMA = Path(__file__).with_name("compose-spec.json")
PROJECT_IMAGE = "tracelearn"
REQUIRED_QUEUES = ("rollout", "grade", "train", "eval", "promote")


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def uses_project_image(service: dict[str, Any]) -> bool:
    return "build" in service or PROJECT_IMAGE in str(service.get("image", ""))


def k8s_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def k8s_containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for doc in k8s_documents():
        spec = doc.get("spec", {})
        template = spec.get("template", {}).get("spec", {})
        for c in template.get("containers", []):
            out.append((f"{doc['kind']}/{doc['metadata']['name']}", c))
    return out


# ------------------------------------------------------------------------- command parsing


def _interpolate(arg: str) -> str:
    # Compose-style ${VAR:-default} / ${VAR:?msg} -> a representative value.
    return re.sub(r"\$\{[A-Z0-9_]+(?::?[-?][^}]*)?\}", "1", arg)


def check_tracelearn(args: list[str]) -> dict[str, Any]:
    """Parse a `tracelearn …` command line with the real Typer app, running nothing; returns the
    command's parsed parameters."""
    import typer

    from app.cli import cli

    # Typer carries its own copy of click (``typer._click``): its groups are not click.Group.
    cmd: Any = typer.main.get_command(cli)
    ctx = typer.Context(cmd, info_name="tracelearn")
    rest = list(args)
    while isinstance(cmd, typer.core.TyperGroup):
        assert rest, "a command group needs a subcommand"
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"`tracelearn` has no command {rest[0]!r}"
        cmd, name, rest = sub, rest[0], rest[1:]
        if isinstance(cmd, typer.core.TyperGroup):
            ctx = typer.Context(cmd, info_name=name, parent=ctx)
        else:
            # Raises on unknown options and bad values.
            return dict(cmd.make_context(name, rest, parent=ctx).params)
    raise AssertionError(f"`tracelearn {' '.join(args)}` does not end in a command")


def check_celery(args: list[str]) -> dict[str, Any]:
    """Parse a `celery -A app <sub> …` command line with Celery's own CLI; returns the
    subcommand's parsed parameters."""
    from celery.app.utils import find_app
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    names = set(celery.list_commands(click.Context(celery)))
    at = next(i for i, a in enumerate(args) if a in names)
    ctx = celery.make_context("celery", args[:at])
    app_name = ctx.params.get("app")
    assert app_name == "workers.celery_app", f"unexpected Celery app {app_name!r}"
    ctx.obj = CLIContext(app=find_app(app_name), no_color=True, workdir=None, quiet=True)
    sub = celery.get_command(ctx, args[at])
    assert sub is not None
    params: dict[str, Any] = sub.make_context(args[at], args[at + 1 :], parent=ctx).params
    params["_subcommand"] = args[at]
    return params


def check_command(argv: list[str]) -> dict[str, Any]:
    argv = [_interpolate(a) for a in argv]
    program = Path(argv[0]).name
    if program == "tracelearn":
        params = check_tracelearn(argv[1:])
        if argv[1] == "worker":  # it execs Celery: check the command line it would run
            celery_argv = worker_argv(params.pop("queues"), **params)
            assert celery_argv[1:3] == ["-m", "celery"]
            return check_command(["celery", *celery_argv[3:]])
        return {"_program": "tracelearn", "_subcommand": argv[1]}
    if program == "celery":
        params = check_celery(argv[1:])
        if params["_subcommand"] == "worker":
            from workers.celery_app import QUEUES

            assert set(params["queues"]) <= set(QUEUES), params["queues"]
        if params["_subcommand"] == "beat":
            import importlib

            module, _, attr = str(params["scheduler"]).partition(":")
            assert hasattr(importlib.import_module(module), attr)
        return {"_program": "celery", **params}
    raise AssertionError(f"unknown program {argv[0]!r}: teach this test how to check it")


# ------------------------------------------------------------------------- compose


def test_compose_validates_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema_rs.validator_for(schema)
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}"
              for e in validator.iter_errors(compose())]
    assert errors == []


def test_the_schema_check_catches_a_broken_file() -> None:
    # Guards against a validator that accepts everything (wrong draft, unresolved refs…).
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()))
    broken = json.loads(json.dumps(compose()))
    broken["services"]["api"]["healthcheck"]["interval"] = ["not", "a", "duration"]
    broken["services"]["api"]["no_such_key"] = 1
    assert len(list(validator.iter_errors(broken))) >= 2


def test_the_full_stack_is_there() -> None:
    svc = services()
    needed = {"postgres", "redis", "migrate", "api", "beat", "vllm", "flower",
              *(f"worker-{q}" for q in REQUIRED_QUEUES)}
    assert needed <= set(svc), needed - set(svc)
    assert [n for n in svc if "beat" in n] == ["beat"], "exactly one scheduler"
    vllm = svc["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    assert vllm["profiles"] == ["gpu"]
    assert "--enable-lora" in vllm["command"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] in ("True", "1", "true")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)


def test_every_long_running_service_has_a_healthcheck_or_says_why_not() -> None:
    text = COMPOSE.read_text()
    for name, service in services().items():
        if name == "migrate":
            continue
        hc = service.get("healthcheck")
        assert hc is not None, f"{name} has no healthcheck"
        if hc.get("disable"):
            # A disabled check must carry its reason next to it in the file.
            block = text[text.index(f"\n  {name}:"):]
            block = block[: block.index("\n\n")] if "\n\n" in block else block
            assert re.search(r"disable: true\s+#", block) or name in (
                "worker-eval", "worker-promote", "beat"
            ), f"{name}: say why its healthcheck is disabled"
        else:
            assert hc["test"], name


def test_every_queue_has_a_worker_and_train_runs_one_task_at_a_time() -> None:
    from workers.celery_app import QUEUES

    consumed: dict[str, dict[str, Any]] = {}
    for service in services().values():
        if uses_project_image(service) and "worker" in service.get("command", []):
            params = check_command(service["command"])
            for q in params["queues"]:
                consumed[q] = params
    assert set(QUEUES) <= set(consumed), set(QUEUES) - set(consumed)
    train = consumed["train"]
    assert train["pool"].__name__ == "TaskPool" and "solo" in train["pool"].__module__
    assert train["concurrency"] == 1 and train["queues"] == ["train"]


def test_every_compose_command_exists_in_the_project() -> None:
    checked = 0
    for name, service in services().items():
        if not uses_project_image(service):
            continue
        assert isinstance(service.get("command"), list), f"{name}: use the exec (list) form"
        check_command(service["command"])
        checked += 1
    assert checked >= 9


def test_project_services_share_one_image_and_the_data_volume() -> None:
    for name, service in services().items():
        if uses_project_image(service):
            assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
            assert "tracelearn-data:/data" in service["volumes"], name
            env = service["environment"]
            assert env["TRACELEARN_DATA_DIR"] == "/data", name
            assert env["TRACELEARN_DATABASE_URL"].startswith("postgresql+psycopg://"), name
            assert env["TRACELEARN_BROKER_URL"].startswith("redis://"), name
    assert "tracelearn-data:/data:ro" in services()["vllm"]["volumes"]


# ------------------------------------------------------------------------- the rest of deploy/


def test_env_example_names_only_real_settings_and_every_required_variable() -> None:
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    keys = {ln.lstrip("# ").split("=", 1)[0] for ln in lines
            if re.match(r"^#?\s*[A-Z][A-Z0-9_]*=", ln)}
    for key in (k for k in keys if k.startswith("TRACELEARN_")):
        assert key.removeprefix("TRACELEARN_").lower() in Settings.model_fields, key
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text()))
    assert required <= keys, required - keys
    assert "TRACELEARN_SESSION_SECRET" in keys  # production refuses the default


def test_dockerfile_installs_the_project_from_its_pyproject_as_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    # The dependencies come from the hash-pinned lock (tests/deploy/test_lock.py), the project
    # on top of them with --no-deps.
    assert "COPY pyproject.toml" in text
    assert re.search(r"pip install --no-deps (--\S+ )*\.(\s|$)", text)
    for package in ("app", "workers", "migrations"):
        assert f"COPY {package} ./{package}" in text
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    check_command(cmd)


def test_k8s_manifests_parse_and_run_real_commands() -> None:
    docs = k8s_documents()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "Job", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    queues: set[str] = set()
    for where, container in k8s_containers():
        image = container["image"]
        if image.startswith(PROJECT_IMAGE):
            params = check_command(container["command"])
            queues.update(params.get("queues", []))
        elif image.startswith("vllm/vllm-openai"):
            args = container["args"]
            assert "--enable-lora" in args, where
            tp = int(args[args.index("--tensor-parallel-size") + 1])
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == tp, where
    from workers.celery_app import QUEUES

    assert set(QUEUES) <= queues
    beats = [d for d in docs if d["kind"] == "Deployment" and "beat" in d["metadata"]["name"]]
    assert len(beats) == 1 and beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"]["type"] == "Recreate"


def test_systemd_units_run_real_commands() -> None:
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert len(units) >= 4
    for unit in units:
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                argv = shlex.split(line.removeprefix("ExecStart="))
                # systemd specifiers: %i is the instance (a queue), %% a literal percent.
                argv = [a.replace("%i", "rollout").replace("%%", "%") for a in argv]
                argv = [re.sub(r"\$\{POOL\}", "solo", a) for a in argv]
                argv = [re.sub(r"\$\{CONCURRENCY\}", "1", a) for a in argv]
                check_command(argv)


@pytest.mark.parametrize("path", ["docker-compose.yml", ".env.example", "k8s", "systemd"])
def test_no_real_secrets_in_deploy_files(path: str) -> None:
    files = [DEPLOY / path] if (DEPLOY / path).is_file() else sorted((DEPLOY / path).iterdir())
    for f in files:
        text = f.read_text()
        assert not re.search(r"tl_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}", text), f"an API key in {f}"
        pattern = r"(?<![{\w])[A-Z_]*(?:PASSWORD|SECRET|BASIC_AUTH)[A-Z_]*\s*[:=]\s*([^\s#]+)"
        for m in re.finditer(pattern, text):
            value = m.group(1)
            assert value.startswith("${") or "change" in value.lower(), (f, m.group(0))
