"""deploy/ stays consistent with the code, without a container engine.

- every YAML/JSON file parses;
- every ``hlbook`` command line in docker-compose, the systemd units and the
  Kubernetes manifests parses with the real CLI (``hlbook.cli.app`` through
  click): real subcommand, real flags, valid values, required options given
  (by flag or by the environment the deployment sets), and every ``HLBOOK_*``
  variable a deployment sets is read by some flag;
- ports agree: each connector endpoint points at the binder of the right
  socket (books at ingest's pub/replay, the gateway at ingest's pub and at
  shard k's pub/query in shard order), shard indices are 0..N-1 and every
  process agrees on N, ports on one network namespace are distinct, the
  gateway's healthcheck/probes/Service/published port match its --port, and
  the Prometheus targets match the metrics ports;
- every metric name in the Grafana dashboard exists in the code (the
  prometheus_client registry after importing every metrics module);
- the Dockerfile copies every source folder pyproject installs from, and
  package data folders (services/*/static) are declared in pyproject.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from hlbook import cli
from hlbook.common import config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "hlbook.json"

GROUP = typer.main.get_command(cli.app)
COMMANDS = GROUP.commands  # name -> click command
ALL_ENVVARS = {
    envvar
    for command in COMMANDS.values()
    for param in command.params
    for envvar in ([param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ()))
}


# --------------------------------------------------------------------------- helpers


@dataclass
class Proc:
    """One ``hlbook`` process of a deployment: where it runs and its parsed flags."""

    where: str  # compose service / systemd unit instance / k8s workload/container
    host: str  # the name other processes reach it by
    netns: str  # processes in one network namespace must not bind the same port
    argv: list[str]
    env: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return self.argv[0]


@contextmanager
def environment(env: dict[str, str]):
    """os.environ with every HLBOOK_* variable replaced by ``env``."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith(config.ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse(proc: Proc) -> dict[str, Any]:
    """The command's parameters as click resolves them from argv and env; fails on
    an unknown subcommand or flag, a bad value or a missing required option."""
    assert proc.command in COMMANDS, f"{proc.where}: `hlbook {proc.command}` is not a subcommand ({sorted(COMMANDS)})"
    command = COMMANDS[proc.command]
    with environment(proc.env):
        try:
            ctx = command.make_context(proc.command, list(proc.argv[1:]))
        except Exception as exc:  # click's UsageError/BadParameter/NoSuchOption/MissingParameter
            pytest.fail(f"{proc.where}: `hlbook {shlex.join(proc.argv)}`: {type(exc).__name__}: {exc}")
    proc.params = ctx.params
    return ctx.params


def endpoint(value: str) -> tuple[str, int]:
    """(host, port) of a tcp:// endpoint."""
    parts = urlsplit(value)
    assert parts.scheme == "tcp" and parts.hostname and parts.port, f"not a tcp://HOST:PORT endpoint: {value!r}"
    return parts.hostname, parts.port


BIND_ALL = {"0.0.0.0", "*"}


def binds(proc: Proc) -> dict[str, int]:
    """Socket role -> port the process binds."""
    p = proc.params
    if proc.command == "ingest":
        out = {"ingest_pub": endpoint(p["pub"])[1], "ingest_replay": endpoint(p["replay"])[1]}
        if p["metrics_port"]:
            out["metrics"] = p["metrics_port"]
        return out
    if proc.command == "book":
        pub_default, query_default = config.book_endpoints(p["shard"])
        out = {"book_pub": endpoint(p["pub"] or pub_default)[1], "book_query": endpoint(p["query"] or query_default)[1]}
        if p["metrics_port"]:
            out["metrics"] = p["metrics_port"]
        return out
    if proc.command == "history":
        out = {"history_pub": endpoint(p["pub"])[1], "history_query": endpoint(p["query"])[1]}
        if p["metrics_port"]:
            out["metrics"] = p["metrics_port"]
        return out
    if proc.command == "gateway":
        return {"http": p["port"]}
    if proc.command == "sim":
        return {"info": p["info_port"]} if p["info_port"] > 0 else {}
    raise AssertionError(f"{proc.where}: unexpected command {proc.command}")


def bind_hosts(proc: Proc) -> list[str]:
    p = proc.params
    if proc.command == "ingest":
        return [endpoint(p["pub"])[0], endpoint(p["replay"])[0]]
    if proc.command == "book":
        return [endpoint(e)[0] for e in (p["pub"], p["query"]) if e] or ["127.0.0.1"]
    if proc.command == "history":
        return [endpoint(p["pub"])[0], endpoint(p["query"])[0]]
    if proc.command == "gateway":
        return [p["host"]]
    if proc.command == "sim":
        return [p["info_host"]]
    return []


def gateway_book_endpoints(proc: Proc) -> tuple[list[str], list[str]]:
    """(pub, query) endpoints the gateway connects to, in shard order."""
    p = proc.params
    defaults = [config.book_endpoints(k) for k in range(p["shards"])]  # every shard on this host
    pubs = list(p["book_pub"] or ()) or [pub for pub, _ in defaults]
    queries = list(p["book_query"] or ()) or [query for _, query in defaults]
    return pubs, queries


def check_topology(procs: list[Proc], resolve) -> None:
    """Connectors point at the right binders; shards 0..N-1; ports distinct per
    network namespace. ``resolve(connector, host, port)`` -> (binder Proc, port
    it binds) or None."""
    for proc in procs:
        parse(proc)
    by_cmd: dict[str, list[Proc]] = {}
    for proc in procs:
        by_cmd.setdefault(proc.command, []).append(proc)
    assert len(by_cmd.get("ingest", [])) == 1, "exactly one ingest"
    books = sorted(by_cmd.get("book", []), key=lambda b: b.params["shard"])
    assert books, "no book shard"
    n = books[0].params["shards"]
    assert [b.params["shard"] for b in books] == list(range(n)), f"shard indices {[b.params['shard'] for b in books]} for --shards {n}"
    assert all(b.params["shards"] == n for b in books), "books disagree on --shards"
    for b in books:
        assert b.params["info_url"] or b.params["snapshot_file"], f"{b.where}: needs --info-url or --snapshot-file"

    def target(connector: Proc, value: str, role: str, shard: int | None = None) -> None:
        host, port = endpoint(value)
        found = resolve(connector, host, port)
        assert found, f"{connector.where}: {value} ({role}) reaches no process"
        binder, bound_port = found
        roles = {r for r, prt in binds(binder).items() if prt == bound_port}
        assert role in roles, f"{connector.where}: {value} reaches {binder.where} port {bound_port} ({roles or 'nothing'}), not its {role}"
        if shard is not None:
            assert binder.params["shard"] == shard, f"{connector.where}: {value} is shard {binder.params['shard']}'s, expected shard {shard}'s"

    for b in books:
        target(b, b.params["ingest_pub"], "ingest_pub")
        target(b, b.params["ingest_replay"], "ingest_replay")
    assert len(by_cmd.get("history", [])) == 1, "exactly one history service"
    for h in by_cmd["history"]:
        target(h, h.params["ingest_pub"], "ingest_pub")
    for g in by_cmd.get("gateway", []):
        assert g.params["shards"] == n, f"{g.where}: --shards {g.params['shards']}, books have {n}"
        target(g, g.params["ingest_pub"], "ingest_pub")
        pubs, queries = gateway_book_endpoints(g)
        assert len(pubs) == len(queries) == n, f"{g.where}: {len(pubs)} --book-pub, {len(queries)} --book-query for {n} shards"
        for k, (pub, query) in enumerate(zip(pubs, queries)):
            target(g, pub, "book_pub", k)
            target(g, query, "book_query", k)
        assert g.params["history_pub"] and g.params["history_query"], f"{g.where}: no history service"
        target(g, g.params["history_pub"], "history_pub")
        target(g, g.params["history_query"], "history_query")

    used: dict[tuple[str, int], str] = {}
    for proc in procs:
        for role, port in binds(proc).items():
            key = (proc.netns, port)
            assert key not in used, f"port {port} bound twice in {proc.netns}: {used[key]} and {proc.where} ({role})"
            used[key] = f"{proc.where} ({role})"


def interpolate(value: str) -> str:
    """docker compose interpolation with nothing set: ${VAR:-default}, ${VAR-default}, ${VAR}, $$."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return m.group(3) or ""

    return re.sub(r"\$\$|\$\{(\w+)(:?-([^}]*))?\}", sub, value)


def deep(value: Any) -> Any:
    if isinstance(value, str):
        return interpolate(value)
    if isinstance(value, list):
        return [deep(v) for v in value]
    if isinstance(value, dict):
        return {k: deep(v) for k, v in value.items()}
    return value


def check_env_names(env: dict[str, str], where: str) -> None:
    for key in env:
        if key.startswith(config.ENV_PREFIX):
            assert key in ALL_ENVVARS, f"{where}: {key} is read by no flag of any command"


def yaml_docs(path: Path) -> list[Any]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


# --------------------------------------------------------------------------- files parse


def test_every_yaml_and_json_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json"))
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {"docker-compose.yml", "prometheus.yml", "grafana/hlbook.json"} <= names
    assert any(n.startswith("k8s/") for n in names)
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert yaml_docs(path), f"{path}: empty"


# --------------------------------------------------------------------------- docker compose


def compose() -> dict[str, Any]:
    return deep(yaml.safe_load(COMPOSE.read_text()))


def compose_procs(with_gateway: bool = True) -> list[Proc]:
    procs = []
    for name, svc in compose()["services"].items():
        argv = [str(a) for a in svc["command"]]
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        env = {k: "" if v is None else str(v) for k, v in env.items()}
        if argv[0] == "gateway" and not with_gateway:
            continue
        procs.append(Proc(f"compose {name}", name, f"compose {name}", argv, env))
    return procs


def compose_resolve(connector: Proc, host: str, port: int, procs: list[Proc]):
    for proc in procs:
        if proc.host == host or (host in ("127.0.0.1", "localhost") and proc.netns == connector.netns):
            if port in binds(proc).values() and set(bind_hosts(proc)) <= BIND_ALL | ({"127.0.0.1"} if proc is connector else set()):
                return proc, port
    return None


def test_compose_services_and_images():
    c = compose()
    services = c["services"]
    assert {"sim", "ingest", "gateway"} <= set(services)
    assert services["sim"].get("profiles") == ["sim"]
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
        if "build" in svc:
            assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        for vol in svc.get("volumes") or ():
            src = vol.split(":")[0]
            if not src.startswith(("/", ".")):
                assert src in (c.get("volumes") or {}), f"{name}: undeclared volume {src}"
        for dep in svc.get("depends_on") or ():
            assert dep in services, f"{name}: depends on unknown {dep}"
            assert "profiles" not in services[dep], f"{name}: depends on {dep}, which only runs in a profile"


def test_compose_command_lines_use_real_commands_and_flags():
    procs = compose_procs()
    assert {p.command for p in procs} >= {"sim", "ingest", "book"}
    for proc in procs:
        parse(proc)
        check_env_names(proc.env, proc.where)


def test_compose_ports_connect():
    procs = compose_procs()
    check_topology(procs, lambda conn, host, port: compose_resolve(conn, host, port, procs))
    books = [p for p in procs if p.command == "book"]
    sim = next(p for p in procs if p.command == "sim")
    for b in books:  # the default info URL is the simulator's
        parts = urlsplit(b.params["info_url"])
        assert (parts.hostname, parts.port) == (sim.host, sim.params["info_port"]), b.where
        assert "0.0.0.0" == sim.params["info_host"]


def test_compose_shared_volumes():
    services = compose()["services"]

    def mounts(name: str) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in services[name].get("volumes") or ()}

    sim, ingest = mounts("sim"), mounts("ingest")
    procs = {p.host: p for p in compose_procs(with_gateway=False)}
    for p in procs.values():
        parse(p)
    # ingest reads the volume the simulator writes
    assert sim[procs["sim"].params["data_dir"]] == ingest[procs["ingest"].params["data_dir"]]
    # books create snapshot files in TMPDIR; the simulator must write there
    for name, p in procs.items():
        if p.command == "book":
            tmp = p.env.get("TMPDIR", "/tmp")
            assert tmp in sim and mounts(name).get(tmp) == sim[tmp], f"{name}: TMPDIR {tmp} is not a volume shared with the simulator"


def test_compose_gateway_ports_and_healthcheck():
    services = compose()["services"]
    (name, svc), = [(n, s) for n, s in services.items() if s["command"][0] == "gateway"]
    g = next(p for p in compose_procs() if p.host == name)
    port = parse(g)["port"]
    assert g.params["host"] == "0.0.0.0"
    assert any(str(m).split(":")[-1] == str(port) for m in svc["ports"]), f"published ports {svc['ports']} miss {port}"
    check = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/ready" in check


# --------------------------------------------------------------------------- systemd


def unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}: {line}"
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path.name}: {line}"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


def systemd_procs() -> list[Proc]:
    procs = []
    units = sorted(SYSTEMD.glob("*.service"))
    assert {u.name for u in units} == {"hlbook-ingest.service", "hlbook-book@.service", "hlbook-gateway.service", "hlbook-history.service"}
    instances = sorted(int(m.group(1)) for f in SYSTEMD.glob("book-*.env") if (m := re.fullmatch(r"book-(\d+)\.env", f.name)))
    assert instances, "no example book-K.env"
    for path in units:
        svc = dict(unit(path)["Service"])  # last value per key, except the lists below
        entries = unit(path)["Service"]
        for instance in instances if path.name.endswith("@.service") else [None]:
            def spec(s: str) -> str:
                return s.replace("%i", str(instance)) if instance is not None else s

            env: dict[str, str] = {}
            for key, value in entries:
                if key == "EnvironmentFile":
                    optional = value.startswith("-")
                    target = Path(spec(value.lstrip("-")))
                    assert target.parent == Path("/etc/hlbook"), value
                    local = SYSTEMD / target.name
                    assert local.exists() or optional, f"{path.name}: no example for {target}"
                    if local.exists():
                        env.update(env_file(local))
                elif key == "Environment":
                    for item in shlex.split(value):
                        k, v = item.split("=", 1)
                        env[k] = spec(v)
            argv = shlex.split(spec(svc["ExecStart"]))
            assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "hlbook", f"{path.name}: ExecStart {argv[0]}"
            name = path.name.replace("@", f"@{instance}") if instance is not None else path.name
            procs.append(Proc(f"systemd {name}", "127.0.0.1", "systemd host", argv[1:], env))
    return procs


def test_systemd_units_restart_and_read_the_environment_file():
    for path in SYSTEMD.glob("*.service"):
        u = unit(path)
        assert {"Unit", "Service", "Install"} <= set(u), path.name
        service = dict(u["Service"])
        assert service.get("Restart") == "on-failure", path.name
        assert ("EnvironmentFile", "/etc/hlbook/hlbook.env") in u["Service"], path.name
        assert "PrivateTmp" not in service or path.name != "hlbook-book@.service", "the node must write into the shard's TMPDIR"


def test_systemd_command_lines_use_real_commands_and_flags():
    procs = systemd_procs()
    for proc in procs:
        parse(proc)
        check_env_names(proc.env, proc.where)
    for path in SYSTEMD.glob("*.env"):
        check_env_names(env_file(path), path.name)


def test_systemd_ports_connect():
    procs = systemd_procs()

    def resolve(conn: Proc, host: str, port: int):
        assert host in ("127.0.0.1", "localhost"), f"{conn.where}: {host}: everything runs on one host"
        for proc in procs:
            if port in binds(proc).values():
                return proc, port
        return None

    check_topology(procs, resolve)
    books = [p for p in procs if p.command == "book"]
    assert len({b.params["metrics_port"] for b in books}) == len(books), "shards need distinct metrics ports"


# --------------------------------------------------------------------------- kubernetes


def k8s_objects() -> list[dict[str, Any]]:
    objs = [d for path in sorted(K8S.glob("*.y*ml")) for d in yaml_docs(path)]
    assert objs
    return objs


def workloads(objs):
    return [o for o in objs if o["kind"] in ("StatefulSet", "Deployment", "DaemonSet")]


def k8s_procs(objs) -> list[Proc]:
    configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in objs if o["kind"] == "ConfigMap"}
    procs = []
    for w in workloads(objs):
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"]:
            assert "command" not in c, f"{c['name']}: keep the image's ENTRYPOINT (hlbook)"
            env: dict[str, str] = {}
            for src in c.get("envFrom") or ():
                name = src["configMapRef"]["name"]
                assert name in configmaps, f"{c['name']}: unknown ConfigMap {name}"
                env.update({k: str(v) for k, v in configmaps[name].items()})
            for item in c.get("env") or ():
                if "value" in item:
                    env[item["name"]] = str(item["value"])
                else:
                    assert item["valueFrom"].get("secretKeyRef", {}).get("optional") or "fieldRef" in item["valueFrom"], item
            argv = [str(a) for a in c["args"]]
            procs.append(Proc(f"k8s {w['metadata']['name']}/{c['name']}", w["metadata"]["name"], f"pod {w['metadata']['name']}", argv, env))
    return procs


def pod_labels(w) -> dict[str, str]:
    return w["spec"]["template"]["metadata"]["labels"]


def test_k8s_objects_are_wired():
    objs = k8s_objects()
    kinds = {o["kind"] for o in objs}
    assert {"ConfigMap", "Service", "StatefulSet", "Deployment"} <= kinds
    for w in workloads(objs):
        labels = pod_labels(w)
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes") or ()}
        names = [c["name"] for c in pod["containers"]]
        assert len(names) == len(set(names))
        port_names = [p["name"] for c in pod["containers"] for p in c.get("ports") or () if "name" in p]
        assert len(port_names) == len(set(port_names)), f"{w['metadata']['name']}: port names repeat"
        assert all(len(n) <= 15 for n in port_names)
        for c in pod["containers"]:
            for m in c.get("volumeMounts") or ():
                assert m["name"] in volumes, f"{c['name']}: unknown volume {m['name']}"
    for s in (o for o in objs if o["kind"] == "Service"):
        assert any(s["spec"]["selector"].items() <= pod_labels(w).items() for w in workloads(objs)), f"Service {s['metadata']['name']} selects no pod"
    sts = [w for w in workloads(objs) if w["kind"] == "StatefulSet"]
    assert sts and all(w["spec"]["replicas"] == 1 for w in sts), "one ingest: the StatefulSet runs one pod"


def test_k8s_command_lines_use_real_commands_and_flags():
    objs = k8s_objects()
    procs = k8s_procs(objs)
    assert {p.command for p in procs} >= {"ingest", "book"}
    for proc in procs:
        parse(proc)
        check_env_names(proc.env, proc.where)
    for o in objs:
        if o["kind"] == "ConfigMap":
            check_env_names(o["data"], f"ConfigMap {o['metadata']['name']}")


def test_k8s_ports_connect():
    objs = k8s_objects()
    procs = k8s_procs(objs)
    by_workload = {w["metadata"]["name"]: w for w in workloads(objs)}
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}

    def resolve(conn: Proc, host: str, port: int):
        if host in ("127.0.0.1", "localhost"):  # same pod
            candidates, target = [p for p in procs if p.netns == conn.netns], port
        else:
            assert host in services, f"{conn.where}: {host} is no Service"
            svc = services[host]
            (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port] or [None]
            if sp is None:
                return None
            target = sp.get("targetPort", port)
            selected = [n for n, w in by_workload.items() if svc["spec"]["selector"].items() <= pod_labels(w).items()]
            candidates = [p for p in procs if p.host in selected]
        for proc in candidates:
            if target in binds(proc).values():
                hosts = set(bind_hosts(proc))
                assert proc.netns == conn.netns or hosts <= BIND_ALL, f"{proc.where} binds {hosts}, unreachable from {conn.where}"
                return proc, target
        return None

    check_topology(procs, resolve)
    # every port a container binds is declared (Services and probes name them)
    for w in workloads(objs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            proc = next((p for p in procs if p.where.endswith(f"/{c['name']}") and p.host == w["metadata"]["name"]), None)
            if proc is None:
                continue
            declared = {p["containerPort"] for p in c.get("ports") or ()}
            assert set(binds(proc).values()) <= declared, f"{proc.where}: binds {binds(proc)}, declares {declared}"


def test_k8s_gateway_probes_and_service():
    objs = k8s_objects()
    (w,) = [w for w in workloads(objs) if any(c["args"][0] == "gateway" for c in w["spec"]["template"]["spec"]["containers"])]
    assert w["kind"] == "Deployment"
    (c,) = [c for c in w["spec"]["template"]["spec"]["containers"] if c["args"][0] == "gateway"]
    (proc,) = [p for p in k8s_procs(objs) if p.command == "gateway"]
    port = parse(proc)["port"]
    assert proc.params["host"] == "0.0.0.0"
    named = {p.get("name"): p["containerPort"] for p in c["ports"]}
    assert port in named.values()

    def probe_port(probe) -> int:
        p = probe["httpGet"]["port"]
        return named[p] if isinstance(p, str) else p

    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and probe_port(c["readinessProbe"]) == port
    assert c["livenessProbe"]["httpGet"]["path"] == "/health" and probe_port(c["livenessProbe"]) == port
    svcs = [o for o in objs if o["kind"] == "Service" and o["spec"]["selector"].items() <= pod_labels(w).items()]
    assert svcs, "no Service in front of the gateways"
    for s in svcs:
        for sp in s["spec"]["ports"]:
            t = sp.get("targetPort", sp["port"])
            assert (named[t] if isinstance(t, str) else t) == port, f"Service {s['metadata']['name']} targets {t}, gateway listens on {port}"


# --------------------------------------------------------------------------- prometheus and grafana


def metric_names() -> set[str]:
    """Every sample name the services can expose (counters: NAME_total)."""
    from prometheus_client import REGISTRY

    importlib.import_module("hlbook.common.metrics")
    modules = sorted(p.parent.name for p in (ROOT / "services").glob("*/metrics.py"))
    assert {"ingest", "book"} <= set(modules)
    for name in modules:
        importlib.import_module(f"hlbook.services.{name}.metrics")
    suffixes = {"counter": ["_total", "_created"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"], "info": ["_info"], "stateset": [""], "enum": [""]}
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("hlbook_"):
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def test_metric_names_are_collected():
    names = metric_names()
    assert "hlbook_ingest_head_height" in names and "hlbook_book_blocks_total" in names
    assert "hlbook_ingest_blocks" not in names  # counters are exposed with _total only


def test_dashboard_uses_existing_metrics_of_every_service():
    dash = json.loads(DASHBOARD.read_text())
    names = metric_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets") or ()]
    assert exprs
    used = {m for e in exprs for m in re.findall(r"\bhlbook_[a-z0-9_]+", e)}
    unknown = sorted(used - names)
    assert not unknown, f"dashboard metrics not in the code: {unknown}"
    prefixes = ["hlbook_ingest_", "hlbook_book_", "hlbook_history_"] + (["hlbook_gateway_"] if (ROOT / "services/gateway/metrics.py").exists() else [])
    for prefix in prefixes:
        assert any(m.startswith(prefix) for m in used), f"no {prefix}* panel"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"] for v in dash["templating"]["list"]}
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"], p["title"]
            uid = p["datasource"]["uid"]
            assert uid.startswith("${") and uid[2:-1] in variables, f"{p['title']}: datasource {uid}"


def test_prometheus_targets_match_metrics_ports():
    prom = yaml.safe_load(PROMETHEUS.read_text())
    names = metric_names()
    text = PROMETHEUS.read_text()
    for m in re.findall(r"\bhlbook_[a-z0-9_]+", text):  # recording rules / relabels naming metrics
        assert m in names, m
    targets: dict[str, set[str]] = {}
    for job in prom["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job["static_configs"]:
            targets.setdefault(job["job_name"], set()).update(sc["targets"])
    procs = compose_procs()
    for p in procs:
        parse(p)
    expected = {
        "hlbook-ingest": {f"{p.host}:{p.params['metrics_port']}" for p in procs if p.command == "ingest"},
        "hlbook-book": {f"{p.host}:{p.params['metrics_port']}" for p in procs if p.command == "book"},
        "hlbook-history": {f"{p.host}:{p.params['metrics_port']}" for p in procs if p.command == "history"},
        "hlbook-gateway": {f"{p.host}:{p.params['port']}" for p in procs if p.command == "gateway"},
    }
    for job, want in expected.items():
        assert 0 not in {int(t.rsplit(":", 1)[1]) for t in want}, f"{job}: metrics off"
        assert targets.get(job) == want, f"{job}: targets {targets.get(job)}, compose serves metrics on {want}"


def test_alert_rules_use_existing_metrics():
    alerts = DEPLOY / "prometheus-alerts.yml"
    assert alerts.name in yaml.safe_load(PROMETHEUS.read_text()).get("rule_files", [])
    rules = [r for g in yaml.safe_load(alerts.read_text())["groups"] for r in g["rules"]]
    assert rules
    names = metric_names()
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule.get("alert")
        unknown = set(re.findall(r"\bhlbook_[a-z0-9_]+", rule["expr"])) - names
        assert not unknown, f"{rule['alert']}: {sorted(unknown)} not in the code"


def test_ingest_and_book_metrics_reachable_from_prometheus():
    procs = compose_procs() + k8s_procs(k8s_objects())
    for proc in procs:
        if proc.command in ("ingest", "book", "history"):
            params = parse(proc)
            assert params.get("metrics_host") in BIND_ALL, f"{proc.where}: metrics served on loopback only"


# --------------------------------------------------------------------------- image


def test_dockerfile_copies_every_source_folder():
    text = (DEPLOY / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = set()
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == "COPY":
            copied.update(w.rstrip("/") for w in words[1:-1] if not w.startswith("--"))
    sources = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    wanted = sources | {"pyproject.toml", "README.md"}
    assert wanted <= copied, f"not copied: {sorted(wanted - copied)}"
    assert re.search(r'^ENTRYPOINT \["hlbook"\]$', text, re.M)
    assert re.search(r"^RUN pip install \.(\s|$)", text, re.M), "install the project (not editable)"
    ignore = DEPLOY / "Dockerfile.dockerignore"
    if ignore.exists():
        lines = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if "**" in lines or "*" in lines:  # allow-list: every copied path re-included
            for src in copied:
                assert f"!{src}/" in lines or f"!{src}" in lines, f"{src} is excluded from the build context"


def test_package_data_is_declared():
    """pip install . (the image) installs only declared data: services/*/static must be."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools_cfg = pyproject["tool"]["setuptools"]
    package_data = setuptools_cfg.get("package-data") or {}
    for static in (ROOT / "services").glob("*/static"):
        package = f"hlbook.services.{static.parent.name}"
        patterns = package_data.get(package, []) + package_data.get("*", [])
        assert any(p.startswith("static/") for p in patterns), f"{static.relative_to(ROOT)} is not in [tool.setuptools.package-data] {package}"
