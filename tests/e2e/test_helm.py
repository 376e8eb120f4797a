"""The Helm chart (helm/kiri) against the real helm binary, promtool and the real local control plane.

Rendering checks (lint, schema, RBAC, pod security, alerts, dashboard) need only the helm binary that
hack/build-binaries.sh builds; the rest installs, upgrades and uninstalls the chart on the cluster from
hack/cluster and asks the API server itself what the operator's ServiceAccount may do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiri_operator import kinds

from .conftest import REPO_ROOT, Cluster

pytestmark = pytest.mark.timeout(300)
# The `namespace` fixture leaves the Jobs' account to the chart here (conftest.compressor_account).
CHART_MAKES_COMPRESSOR_ACCOUNT = True

CHART = REPO_ROOT / "helm" / "kiri"
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"


def _bin_dirs() -> list[str]:
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), "--print-bin-dirs"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.split()


def _with_helm(env: dict[str, str], home: Path) -> dict[str, str]:
    env = dict(env)
    env["PATH"] = os.pathsep.join([*_bin_dirs(), env.get("PATH", "")])
    # Keep helm's caches out of $HOME so runs do not depend on (or pollute) the user's helm setup.
    for var, sub in (
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ):
        env[var] = str(home / sub)
    return env


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment whose PATH finds the helm built from Go modules (no cluster needed)."""
    env = _with_helm(dict(os.environ), tmp_path_factory.mktemp("helm-home"))
    probe = subprocess.run(
        ["helm", "version", "--short"], env=env, capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        raise RuntimeError(f"helm is not built; run `make binaries` ({probe.stderr.strip()})")
    return env


def helm(
    env: dict[str, str], *args: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["helm", *args], env=env, capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def render(env: dict[str, str], *set_args: str, namespace: str = "kiri-system") -> list[dict[str, Any]]:
    out = helm(env, "template", "kiri", str(CHART), "--namespace", namespace, *set_args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def of_component(docs: list[dict[str, Any]], kind: str, component: str) -> list[dict[str, Any]]:
    """The chart's objects of `kind` whose app.kubernetes.io/component is `component` (operator, store)."""
    return [d for d in by_kind(docs, kind) if d["metadata"]["labels"].get(LABEL_COMPONENT) == component]


LABEL_COMPONENT = "app.kubernetes.io/component"
# The local cluster has no StorageClass, so the store's default claim would stay Pending and `--wait` time
# out: installs here keep the store's files in an emptyDir.
NO_STORAGE_CLASS = ("--set", "store.persistence.enabled=false")


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of_component(docs, "Deployment", "operator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


MONITORING = (
    "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
    "--set", "metrics.podMonitor.enabled=true",
)  # fmt: skip
NAMESPACED = ("--set", "operator.watchNamespaces={team-a,team-b}")


# --- rendering -------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [(), MONITORING, NAMESPACED], ids=["defaults", "monitoring", "namespaced"])
def test_lint_strict(helm_env: dict[str, str], values: tuple[str, ...]) -> None:
    result = helm(helm_env, "lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (("--set", "leaderElection.enabled=false"), "replicaCount above 1 needs leaderElection.enabled"),
        (("--set", "leaderElection.renewDeadline=15"), "renewDeadline must be below"),
        (("--set", "compressor.createPerModelDeployment=true"), "needs operator.watchNamespaces"),
        (("--set", "securityContext.readOnlyRootFilesystem=false"), "readOnlyRootFilesystem"),
        (("--set", "podSecurityContext.runAsNonRoot=false"), "runAsNonRoot"),
        (("--set", "imagePullPolicy=Always"), "imagePullPolicy"),
        (("--set", "operator.logLevel=LOUD"), "logLevel"),
        (("--set", "operator.watchNamespaces={a,a}"), "watchNamespaces"),
        (
            ("--set", "metrics.service.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"),
            "metrics",
        ),
        (("--set", "analysis.allowedPrometheus={http://user:pass@prom:9090}"), "allowedPrometheus"),
    ],
    ids=[
        "two-replicas-without-a-lease",
        "renew-deadline-past-the-lease",
        "operator-made-roles-cluster-wide",
        "writable-root",
        "root",
        "unknown-key",
        "bad-enum",
        "repeated-namespace",
        "monitor-without-service",
        "prometheus-with-userinfo",
    ],
)
def test_bad_values_are_refused_with_the_key(
    helm_env: dict[str, str], bad: tuple[str, ...], message: str
) -> None:
    result = helm(helm_env, "template", "kiri", str(CHART), *bad, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def roles_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return by_kind(docs, "Role")


def _rbac_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]


@pytest.mark.parametrize("values", [(), NAMESPACED], ids=["cluster", "namespaced"])
def test_rbac_is_least_privilege(helm_env: dict[str, str], values: tuple[str, ...]) -> None:
    docs = render(helm_env, *values)
    rules = _rbac_rules(docs)
    assert rules
    for rule in rules:
        for field in ("verbs", "resources", "apiGroups"):
            assert "*" not in rule[field], f"wildcard {field} in {rule}"
        assert "nonResourceURLs" not in rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        assert not {"nodes/proxy", "pods/exec", "serviceaccounts/token"} & set(rule["resources"])
        if "secrets" in rule["resources"]:
            # The learning rounds' TLS Secret: created, never read (no get/list/watch on any Secret).
            assert rule["resources"] == ["secrets"] and rule["verbs"] == ["create"], rule

    def verbs(group: str, resource: str) -> set[str]:
        return {
            v for r in rules if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]
        }

    assert verbs("", "nodes") == {"get", "list", "watch"}  # Kiri never mutates Node objects.
    assert verbs("apiextensions.k8s.io", "customresourcedefinitions") == {"list", "watch"}  # kopf discovery
    assert verbs("", "namespaces") == {"list", "watch"}
    assert verbs("", "pods") == {"get", "list", "watch"}
    # kopf runs event handlers only: the operator reads ModelDeployments and writes nothing but their status.
    assert verbs("kiri.dev", "modeldeployments") == {"get", "list", "watch"}
    assert "patch" in verbs("kiri.dev", "modeldeployments/status")
    assert verbs("kiri.dev", "modeldeployments/finalizers") == {"update"}
    assert "create" in verbs("", "events")
    # Standalone kopf: no peering objects, so no permission on them.
    assert not verbs("kopf.dev", "kopfpeerings") and not verbs("kopf.dev", "clusterkopfpeerings")
    # The operator makes no ServiceAccount, Role or RoleBinding: not even read access to them.
    operator_rules = [
        r
        for d in docs
        if d["kind"] in ("ClusterRole", "Role") and not d["metadata"]["name"].startswith("kiri-compressor")
        for r in d["rules"]
    ]
    for resource in ("serviceaccounts", "roles", "rolebindings", "clusterroles", "clusterrolebindings"):
        assert not [r for r in operator_rules if resource in r["resources"]], resource
    # Leader election: get and update the one Lease by name; create (which RBAC cannot limit by name).
    (leader,) = [d for d in roles_of(docs) if d["metadata"]["name"] == "kiri-leader-election"]
    assert leader["metadata"]["namespace"] == "kiri-system"
    assert leader["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["kiri-leader"],
         "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]  # fmt: skip
    for group, resource in (("apps", "daemonsets"), ("apps", "deployments"), ("batch", "jobs")):
        assert {"create", "patch", "delete"} <= verbs(group, resource)
    # Every child kind the operator watches, lists, applies and deletes (the kind registry, not a copy of it):
    # one the chart forgot would fail the operator's watch at start.
    for child in kinds.children(accounts=False):
        assert {"get", "list", "watch", "create", "patch", "delete"} <= verbs(child.group, child.plural), (
            child
        )
    assert verbs("networking.k8s.io", "networkpolicies") == {
        "get", "list", "watch", "create", "patch", "update", "delete",
    }  # fmt: skip

    cluster_roles = by_kind(docs, "ClusterRole")
    roles = [r for r in roles_of(docs) if r["metadata"]["name"] == "kiri"]
    compressor_roles = [r for r in roles_of(docs) if r["metadata"]["name"] == "kiri-compressor"]
    if values == NAMESPACED:
        # The Jobs' account in each watched namespace: create ConfigMaps, nothing else.
        assert [r["metadata"]["namespace"] for r in compressor_roles] == ["team-a", "team-b"]
        for role in compressor_roles:
            assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}]
        accounts = [a for a in by_kind(docs, "ServiceAccount") if a["metadata"]["name"] == "kiri-compressor"]
        assert [a["automountServiceAccountToken"] for a in accounts] == [False, False]
    else:
        assert not compressor_roles
    if values == NAMESPACED:
        # Watching some namespaces: the ClusterRole only reads nodes (and what kopf observes); the rest
        # is granted per namespace.
        assert [r["resources"] for r in cluster_roles[0]["rules"]] == [
            ["nodes"],
            ["customresourcedefinitions"],
            ["namespaces"],
        ]
        assert [r["metadata"]["namespace"] for r in roles] == ["team-a", "team-b"]
        bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == "kiri"]
        assert [b["metadata"]["namespace"] for b in bindings] == ["team-a", "team-b"]
    else:
        assert not roles
    args = operator_container(docs)["args"]
    assert "--standalone" in args
    assert [a for a in args if a.startswith("--namespace")] == (
        ["--namespace=team-a", "--namespace=team-b"] if values else []
    )


def test_operator_pod_is_non_root_with_read_only_root(helm_env: dict[str, str]) -> None:
    docs = render(helm_env)
    (deployment,) = of_component(docs, "Deployment", "operator")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    # Read-only root: the only writable path is the /tmp emptyDir.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # Two replicas and a Lease: the surge replica overlaps safely, only the Lease holder reconciles.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    # The liveness probe hits the port and path kopf's --liveness endpoint listens on; readiness too (a
    # standby is as ready as the leader: see values.yaml).
    liveness_arg = next(a for a in container["args"] if a.startswith("--liveness="))
    probe = container["livenessProbe"]["httpGet"]
    assert container["readinessProbe"]["httpGet"] == probe
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == probe["port"])
    assert liveness_arg == f"--liveness=http://0.0.0.0:{port}{probe['path']}"
    metrics_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert f"--metrics-port={metrics_port}" in container["args"]
    # The real `kiri` parser accepts the container's arguments (the image's entrypoint is `kiri`).
    from kiri_operator.cli import build_parser

    parsed = build_parser().parse_args(container["args"])
    assert parsed.command == "operator" and parsed.standalone
    assert parsed.leader_elect and parsed.leader_elect_resource_name == "kiri-leader"
    assert (
        parsed.leader_elect_lease_duration,
        parsed.leader_elect_renew_deadline,
        parsed.leader_elect_retry_period,
    ) == (15, 10, 2)
    assert parsed.compressor_service_account == "kiri-compressor" and not parsed.create_compressor_rbac
    assert parsed.liveness == liveness_arg.removeprefix("--liveness=")
    assert parsed.metrics_port == metrics_port
    # The analysis allow-list reaches the operator: by default the Prometheus Operator's Service alone.
    assert parsed.allowed_prometheus == ["http://prometheus-operated.monitoring.svc:9090"]
    (service,) = of_component(docs, "Service", "operator")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_the_disruption_budget_keeps_one_operator_pod_and_only_with_two_replicas(
    helm_env: dict[str, str],
) -> None:
    docs = render(helm_env)
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    (deployment,) = of_component(docs, "Deployment", "operator")
    assert pdb["spec"]["minAvailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    # With one replica a minAvailable 1 budget would block every node drain: none is rendered.
    assert not by_kind(render(helm_env, "--set", "replicaCount=1"), "PodDisruptionBudget")


def test_operator_made_accounts_are_granted_per_watched_namespace_only(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, *NAMESPACED, "--set", "compressor.createPerModelDeployment=true")
    assert "--create-compressor-rbac" in operator_container(docs)["args"]
    # No chart-made account for the Jobs then: the operator makes one per ModelDeployment.
    assert not [a for a in by_kind(docs, "ServiceAccount") if a["metadata"]["name"] == "kiri-compressor"]
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert not [r for r in cluster_role["rules"] if {"roles", "serviceaccounts"} & set(r["resources"])]
    for role in [r for r in roles_of(docs) if r["metadata"]["name"] == "kiri"]:
        assert any("roles" in r["resources"] and "create" in r["verbs"] for r in role["rules"])


def test_the_store_is_a_non_root_pod_behind_its_own_service_and_the_operators_default_store(
    helm_env: dict[str, str],
) -> None:
    from kiri_operator.cli import build_parser

    docs = render(helm_env)
    (store,) = of_component(docs, "Deployment", "store")
    (service,) = of_component(docs, "Service", "store")
    (claim,) = of_component(docs, "PersistentVolumeClaim", "store")
    pod = store["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 65532
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False  # it never talks to the API server
    parsed = build_parser().parse_args(container["args"])
    assert parsed.command == "store" and parsed.root == "/data"
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # The Service selects the store's pod and not the operator's, and the operator defaults to it.
    labels = store["spec"]["template"]["metadata"]["labels"]
    (operator,) = of_component(docs, "Deployment", "operator")
    assert service["spec"]["selector"].items() <= labels.items()
    assert (
        not service["spec"]["selector"].items() <= operator["spec"]["template"]["metadata"]["labels"].items()
    )
    name, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    assert f"--default-artifacts-uri=http://{name}.{ns}.svc:{parsed.port}" in operator_container(docs)["args"]

    off = render(helm_env, "--set", "store.enabled=false")
    assert not of_component(off, "Deployment", "store") and not of_component(off, "Service", "store")
    assert not any(a.startswith("--default-artifacts-uri") for a in operator_container(off)["args"])
    ephemeral = render(helm_env, "--set", "store.persistence.enabled=false")
    assert not by_kind(ephemeral, "PersistentVolumeClaim")
    (store,) = of_component(ephemeral, "Deployment", "store")
    (data,) = [v for v in store["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert data["emptyDir"] == {"sizeLimit": "10Gi"}


@pytest.fixture(scope="module")
def alert_rules(helm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    docs = render(helm_env, *MONITORING)
    (rule,) = by_kind(docs, "PrometheusRule")
    path = tmp_path_factory.mktemp("rules") / "kiri-rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def test_alert_rules_pass_promtool_check(alert_rules: Path) -> None:
    result = subprocess.run([PROMTOOL, "check", "rules", str(alert_rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def _alert(labels: dict[str, str], summary: str, description: str) -> dict[str, Any]:
    return {"exp_labels": labels, "exp_annotations": {"summary": summary, "description": description}}


def test_alerts_fire_on_their_conditions(alert_rules: Path, tmp_path: Path) -> None:
    """promtool evaluates the rendered alerts over input series: each fires when, and only when, it should."""
    phase = 'kiri_modeldeployment_phase{{namespace="shop",modeldeployment="{md}",phase="{phase}"}}'
    series = [
        # shop/stuck stays Progressing for 40m; shop/quick finishes after 10m; shop/held is Paused on purpose.
        (phase.format(md="stuck", phase="Progressing"), "1x40"),
        (phase.format(md="quick", phase="Progressing"), "1x10 0x30"),
        (phase.format(md="quick", phase="Healthy"), "0x10 1x30"),
        (phase.format(md="held", phase="Paused"), "1x40"),
        # shop/bad rolls back at minute 6 and stays rolled back until a fixed spec comes at minute 30.
        (phase.format(md="bad", phase="Progressing"), "1x5 0x24 1x10"),
        (phase.format(md="bad", phase="RolledBack"), "0x5 1x24 0x10"),
        ('kiri_variants{namespace="shop",modeldeployment="quick",variant="int8",state="Rejected"}', "1x40"),
        ('kiri_variants{namespace="shop",modeldeployment="quick",variant="fp16",state="Verified"}', "1x40"),
        ('up{job="kiri-metrics"}', "1x10 0x30"),
    ]
    stuck = _alert(
        {"severity": "warning", "namespace": "shop", "modeldeployment": "stuck"},
        "Rollout of shop/stuck has not finished for 30m",
        "Run `kiri status stuck -n shop` to see the held wave and its gate.",
    )
    rolled_back = _alert(
        {"severity": "warning", "namespace": "shop", "modeldeployment": "bad"},
        "shop/bad rolled back to its last good revision",
        "The new revision failed a health gate (`kiri status bad -n shop` says which). The same spec is not "
        "rolled out again; apply a fixed one.",
    )
    rejected = _alert(
        {"severity": "info", "namespace": "shop", "modeldeployment": "quick", "variant": "int8"},
        "Variant int8 of shop/quick was rejected by its fidelity gate",
        "Nodes that needed it keep the previous revision. See status.variants for the measured fidelity.",
    )
    down = _alert(
        {"severity": "critical"},
        "The Kiri operator (kiri-metrics) is down or not scraped",
        "Check `kubectl -n kiri-system get pods -l app.kubernetes.io/component=operator`.",
    )
    expectations = [
        ("20m", "KiriRolloutStuck", []),
        ("35m", "KiriRolloutStuck", [stuck]),  # not quick (done), not held (paused on purpose)
        ("4m", "KiriRolledBack", []),
        ("10m", "KiriRolledBack", [rolled_back]),
        ("35m", "KiriRolledBack", []),  # a changed spec is progressing again
        ("5m", "KiriVariantRejected", [rejected]),
        ("8m", "KiriOperatorDown", []),
        ("20m", "KiriOperatorDown", [down]),
    ]
    tests = {
        "rule_files": [str(alert_rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [
                    {"eval_time": t, "alertname": name, "exp_alerts": exp} for t, name, exp in expectations
                ],
            }
        ],
    }
    test_file = tmp_path / "alerts-test.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    result = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _dashboard(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(cm["data"]["kiri.json"])  # type: ignore[no-any-return]


def test_dashboard_is_valid_grafana_json(helm_env: dict[str, str]) -> None:
    dashboard = _dashboard(render(helm_env))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert re.search(r"\bkiri_|\bprocess_", target["expr"]), target["expr"]


def _kiri_metric_names(docs: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    texts = [t["expr"] for p in _dashboard(docs)["panels"] for t in p.get("targets", [])]
    for rule_doc in by_kind(docs, "PrometheusRule"):
        texts += [r["expr"] for g in rule_doc["spec"]["groups"] for r in g["rules"]]
    for text in texts:
        names |= {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"\bkiri_[a-z_]+", text)}
    return names


def _exported(registry: Any) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_and_alerts_only_use_series_kiri_exports(helm_env: dict[str, str]) -> None:
    """Every kiri_* series a panel or an alert queries is registered by the operator or the runtime."""
    from prometheus_client import generate_latest

    from kiri_operator import metering
    from kiri_operator.metrics import REGISTRY
    from kiri_runtime.metrics import RuntimeMetrics

    # One status through the real metering code, so labelled series show up in the exposition.
    metering.meter(
        "shop", "probe", {"phase": "RolledBack", "variants": [{"name": "int8", "state": "Rejected"}]}
    )
    try:
        exported = _exported(REGISTRY) | _exported(RuntimeMetrics().registry)
        text = generate_latest(REGISTRY).decode()
    finally:
        metering.forget("shop", "probe")
    used = _kiri_metric_names(render(helm_env, *MONITORING))
    assert {"kiri_modeldeployment_phase", "kiri_responses_total", "kiri_reconcile_duration_seconds"} <= used
    names = exported | {n.removesuffix("_total") for n in exported}
    missing = sorted(n for n in used if n not in names and n.removesuffix("_total") not in names)
    assert not missing, f"dashboard/alerts query series Kiri does not export: {missing}"
    assert (
        'kiri_modeldeployment_phase{modeldeployment="probe",namespace="shop",phase="RolledBack"} 1.0' in text
    )
    assert "process_resident_memory_bytes" in text


# --- on the real control plane ---------------------------------------------------------------------


@pytest.fixture
def release(
    cluster: Cluster, namespace: str, helm_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[str, dict[str, str]]]:
    env = _with_helm(cluster.env, tmp_path / "helm-home")
    name = "kiri-" + namespace[-6:]
    yield name, env
    helm(env, "uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)


def test_rendered_chart_passes_server_side_dry_run(
    cluster: Cluster, namespace: str, helm_env: dict[str, str]
) -> None:
    # Both RBAC shapes: cluster-wide, and watching only this test's namespace (Roles land there).
    for values in ((), ("--set", f"operator.watchNamespaces={{{namespace}}}")):
        text = helm(
            helm_env, "template", "kiri", str(CHART), "--namespace", namespace, "--include-crds", *values
        ).stdout
        out = cluster.kubectl(
            "apply", "--server-side", "--dry-run=server", "--field-manager=helm-test",
            # The CRD may already be owned by an earlier install; a dry run writes nothing either way.
            "--force-conflicts",
            "-f", "-",
            input=text,
        )  # fmt: skip
        kinds = ["serviceaccount", "clusterrole", "clusterrolebinding", "deployment", "service", "configmap"]
        kinds += ["customresourcedefinition"] + (["role", "rolebinding"] if values else [])
        for kind in kinds:
            assert re.search(rf"^{kind}[./]", out, re.M | re.I), f"{kind} missing from dry run:\n{out}"
    # A dry run writes nothing.
    assert not cluster.kubectl("get", "deployments", "-n", namespace, "-o", "name").strip()


def _operator_pods(cluster: Cluster, namespace: str, release_name: str) -> list[dict[str, Any]]:
    pods = cluster.get_json(
        "pods",
        "-n",
        namespace,
        "-l",
        f"app.kubernetes.io/instance={release_name},app.kubernetes.io/component=operator",
    )["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _ready(pod: dict[str, Any] | None) -> bool:
    if not pod or not pod["spec"].get("nodeName"):
        return False
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _ready_operator_pods(
    cluster: Cluster, namespace: str, release_name: str, replicas: int = 2
) -> list[dict[str, Any]] | None:
    pods = _operator_pods(cluster, namespace, release_name)
    return pods if len(pods) == replicas and all(_ready(p) for p in pods) else None


def test_install_upgrade_uninstall(
    cluster: Cluster, namespace: str, release: tuple[str, dict[str, str]]
) -> None:
    name, env = release
    # The CRD is the other e2e tests' (applied with kubectl): this release leaves it alone.
    helm(
        env, "install", name, str(CHART), "--namespace", namespace, "--set", "crds.install=false", *NO_STORAGE_CLASS,
        "--set", f"compressor.namespaces={{{namespace}}}", "--wait", "--timeout", "120s",
    )  # fmt: skip

    pods = cluster.wait_for(
        lambda: _ready_operator_pods(cluster, namespace, name),
        timeout=90,
        message="two operator pods scheduled and Ready",
    )
    assert pods is not None
    pod = pods[0]
    # Both replicas Ready (leader or standby): the budget allows one eviction, so a drain never blocks.
    pdb = cluster.wait_for(
        lambda: (
            (b := cluster.get_json("pdb", name, "-n", namespace)).get("status", {}).get("currentHealthy") == 2
            and b
        ),
        timeout=60,
        message="PodDisruptionBudget status",
    )
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["status"]["disruptionsAllowed"] == 1
    node = cluster.get_json("node", pod["spec"]["nodeName"])
    # The real scheduler placed it on a real (simulated) node, which kwok then ran.
    assert node["metadata"]["name"] == pod["spec"]["nodeName"]
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    sa = f"system:serviceaccount:{namespace}:{name}"

    # The API server's own authorizer says what the operator's identity may do.
    def can_i(*args: str) -> bool:
        return cluster.kubectl("auth", "can-i", "--as", sa, *args, check=False).strip() == "yes"

    assert can_i("list", "modeldeployments.kiri.dev", "--all-namespaces")
    assert can_i("patch", "modeldeployments.kiri.dev", "--subresource=status", "-n", "default")
    assert can_i("watch", "nodes")
    assert can_i("create", "daemonsets.apps", "-n", "default")
    assert can_i("create", "jobs.batch", "-n", "default")
    assert can_i("create", "events", "-n", "default")
    assert not can_i("patch", "nodes")
    assert not can_i("get", "secrets", "-n", namespace)
    assert not can_i("create", "pods", "-n", "default")
    assert not can_i("delete", "modeldeployments.kiri.dev", "-n", "default")
    assert not can_i("create", "clusterrolebindings")
    # It makes no ServiceAccount, Role or RoleBinding, anywhere (the chart makes the Jobs' account).
    for verb in ("create", "patch", "update", "delete", "list"):
        for resource in ("roles.rbac.authorization.k8s.io", "rolebindings.rbac.authorization.k8s.io",
                         "serviceaccounts"):  # fmt: skip
            assert not can_i(verb, resource, "--all-namespaces"), (verb, resource)
            assert not can_i(verb, resource, "-n", namespace), (verb, resource)
    # Leader election: its own Lease by name, no other Lease; create is by kind (RBAC has no name yet).
    lease = f"{name}-leader"
    assert can_i("get", f"leases.coordination.k8s.io/{lease}", "-n", namespace)
    assert can_i("update", f"leases.coordination.k8s.io/{lease}", "-n", namespace)
    assert can_i("create", "leases.coordination.k8s.io", "-n", namespace)
    assert not can_i("update", "leases.coordination.k8s.io/kube-scheduler", "-n", namespace)
    assert not can_i("get", "leases.coordination.k8s.io/kube-controller-manager", "-n", "kube-system")
    assert not can_i("delete", f"leases.coordination.k8s.io/{lease}", "-n", namespace)
    kubectl_create_role = [
        "kubectl", "create", "role", "probe", "-n", namespace, "--verb=get", "--resource=configmaps",
        "--as", sa, "--dry-run=server", "-o", "name",
    ]  # fmt: skip
    refused = subprocess.run(
        kubectl_create_role, env=cluster.env, capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0 and "forbidden" in refused.stderr, refused.stdout + refused.stderr

    # The Jobs' account (made by the chart here): create a ConfigMap, and touch no existing one.
    job_sa = f"system:serviceaccount:{namespace}:kiri-compressor"

    def job_can(*args: str) -> bool:
        return cluster.kubectl("auth", "can-i", "--as", job_sa, *args, check=False).strip() == "yes"

    assert job_can("create", "configmaps", "-n", namespace)
    for verb in ("get", "list", "watch", "patch", "update", "delete"):
        assert not job_can(verb, "configmaps/someone-elses", "-n", namespace), verb
        assert not job_can(verb, "configmaps", "-n", namespace), verb
    assert not job_can("create", "configmaps", "-n", "default")
    assert not job_can("get", "secrets", "-n", namespace)
    assert not job_can("get", "modeldeployments.kiri.dev", "-n", namespace)
    account = cluster.get_json("serviceaccount", "kiri-compressor", "-n", namespace)
    assert account["automountServiceAccountToken"] is False

    helm(
        env, "upgrade", name, str(CHART), "--namespace", namespace, "--reuse-values",
        "--set", "operator.logLevel=DEBUG", "--wait", "--timeout", "120s",
    )  # fmt: skip
    deployment = cluster.get_json("deployment", "-n", namespace, name)
    assert "--log-level=DEBUG" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    cluster.wait_for(
        lambda: (
            (ps := _ready_operator_pods(cluster, namespace, name))
            and all("--log-level=DEBUG" in p["spec"]["containers"][0]["args"] for p in ps)
        ),
        timeout=90,
        message="upgraded operator pod Ready",
    )
    history = json.loads(helm(env, "history", name, "--namespace", namespace, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2]
    assert history[-1]["status"] == "deployed"

    helm(env, "uninstall", name, "--namespace", namespace, "--wait", "--timeout", "120s")
    cluster_role = f"{name}-{namespace}"[:63].rstrip("-")
    assert not cluster.kubectl("get", "clusterrole", cluster_role, "--ignore-not-found", "-o", "name").strip()
    assert not cluster.kubectl(
        "get", "deployment", "-n", namespace, "--ignore-not-found", "-o", "name"
    ).strip()
    assert not cluster.kubectl(
        "get", "serviceaccount", name, "-n", namespace, "--ignore-not-found", "-o", "name"
    ).strip()


# The chart version before the CRD moved into templates/ (it sat in crds/, which Helm never upgrades).
PREVIOUS_CHART = ("0.1.0", "d99f8ac")
CRD_NAME = "modeldeployments.kiri.dev"
PREVIOUS_CHART_DIR = Path(__file__).parent / "fixtures" / "kiri-chart-0.1.0"


def _previous_chart(tmp_path: Path) -> Path:
    # A copy kept in the tree (`git archive d99f8ac helm/kiri`), not read from history: CI may clone shallow.
    chart = tmp_path / "kiri"
    shutil.copytree(PREVIOUS_CHART_DIR, chart)
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["version"] == PREVIOUS_CHART[0]
    return chart


def test_helm_upgrade_from_the_previous_chart_version_updates_the_crd_and_uninstall_keeps_it(
    cluster: Cluster, namespace: str, release: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    name, env = release
    old_chart = _previous_chart(tmp_path)
    # The cluster as chart 0.1.0 leaves it: its CRD (from its crds/, which `helm install` skips when the
    # CRD exists), with the short name `md` the new CRD drops.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(old_chart / "crds"))
    helm(env, "install", name, str(old_chart), "--namespace", namespace, "--wait", "--timeout", "120s")
    before = cluster.get_json("crd", CRD_NAME)
    assert before["spec"]["names"]["shortNames"] == ["md"]
    try:
        # The one-time adoption docs/operations.md gives for upgrades from 0.1.0.
        cluster.kubectl("label", "crd", CRD_NAME, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        cluster.kubectl(
            "annotate", "crd", CRD_NAME, "--overwrite",
            f"meta.helm.sh/release-name={name}", f"meta.helm.sh/release-namespace={namespace}",
        )  # fmt: skip
        helm(env, "upgrade", name, str(CHART), "--namespace", namespace, *NO_STORAGE_CLASS, "--wait",
             "--timeout", "120s")  # fmt: skip
        after = cluster.get_json("crd", CRD_NAME)
        assert after["spec"]["names"]["shortNames"] == ["mdep"]
        assert after["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        conditions = after["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert "Reconciling" in conditions["properties"]["conditions"]["description"]
        cluster.wait_for(
            lambda: any(
                c["type"] == "Established" and c["status"] == "True"
                for c in cluster.get_json("crd", CRD_NAME)["status"]["conditions"]
            ),
            timeout=30,
            message="CRD established",
        )
        manifest = helm(env, "get", "manifest", name, "--namespace", namespace).stdout
        assert f"name: {CRD_NAME}" in manifest  # now part of the release, so the next upgrade updates it too

        helm(env, "uninstall", name, "--namespace", namespace, "--wait", "--timeout", "120s")
        kept = cluster.get_json("crd", CRD_NAME)  # resource-policy keep: no ModelDeployment was deleted
        assert kept["metadata"]["uid"] == before["metadata"]["uid"]
    finally:
        # Leave the CRD as the other e2e tests expect it: current, and owned by no release.
        cluster.kubectl("label", "crd", CRD_NAME, "app.kubernetes.io/managed-by-", check=False)
        cluster.kubectl(
            "annotate", "crd", CRD_NAME, "meta.helm.sh/release-name-", "meta.helm.sh/release-namespace-",
            "helm.sh/resource-policy-", check=False,
        )  # fmt: skip
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))


def test_crds_install_false_renders_no_crd_and_true_renders_it_kept(helm_env: dict[str, str]) -> None:
    def crds(*set_args: str) -> list[dict[str, Any]]:
        return [d for d in render(helm_env, *set_args) if d["kind"] == "CustomResourceDefinition"]

    (crd,) = crds()
    assert crd["metadata"]["name"] == CRD_NAME
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crds("--set", "crds.install=false") == []
    (unkept,) = crds("--set", "crds.keep=false")
    assert not (unkept["metadata"].get("annotations") or {})


def _token_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a real token from the TokenRequest API)."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration", "30m").strip()
    cluster_entry = admin["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kiri", "cluster": cluster_entry["cluster"]}],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "kiri", "user": account}}],
                "current-context": "sa",
            }
        )
    )
    return path


def test_operator_reconciles_under_the_charts_rbac_alone(
    cluster: Cluster, namespace: str, release: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """The real operator, authenticated as the chart's ServiceAccount, takes a ModelDeployment to Healthy.

    The chart is installed watching this namespace only (the tightest RBAC: a Role here, a ClusterRole that
    only reads Nodes). The operator process runs here with a token of that ServiceAccount, and the
    compression Job's publish step with a token of the ServiceAccount the operator made for it. Any
    missing permission shows up as a 403 in the operator's own request counter or as a stuck rollout.
    """
    from .operator_harness import KIRI, build_model, free_port, model_deployment

    name, env = release
    helm(
        env, "install", name, str(CHART), "--namespace", namespace, "--set", "crds.install=false", *NO_STORAGE_CLASS,
        "--set", f"operator.watchNamespaces={{{namespace}}}", "--wait", "--timeout", "120s",
    )  # fmt: skip
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    kubeconfig = _token_kubeconfig(cluster, namespace, name, tmp_path / "operator.kubeconfig")
    op_env = {**cluster.env, "KUBECONFIG": str(kubeconfig)}
    metrics_port, health_port = free_port(), free_port()
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*KIRI, "operator", "--standalone", "--namespace", namespace, "--metrics-port", str(metrics_port),
             "--liveness", f"http://127.0.0.1:{health_port}/healthz",
             # As the chart runs it: the Lease, with the chart's Role on it (a 403 would hold every reconcile).
             "--leader-elect", "--leader-elect-resource-namespace", namespace,
             "--leader-elect-resource-name", f"{name}-leader", "--host-store-root", str(tmp_path)],
            env=op_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )  # fmt: skip
    try:
        import urllib.request

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"operator exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        cluster.wait_for(healthy, timeout=60, message="operator liveness endpoint")

        model, sha = build_model(tmp_path)
        variants = [{"name": "int8", "method": "int8-dynamic"}]
        cluster.apply(model_deployment("rbac", namespace, model, sha, tmp_path / "store", variants))
        job = cluster.wait_for(
            lambda: cluster.get_json("jobs", "-n", namespace, "-l", "kiri.dev/modeldeployment=rbac")["items"],
            timeout=60,
            message=f"compression Job\n{log_path.read_text()[-3000:]}",
        )[0]
        # The Job's containers, run here (simulated nodes run none), each with the Job's ServiceAccount
        # token: `kiri compress` needs no API access, `kiri publish-manifest` writes the manifest ConfigMap.
        pod = job["spec"]["template"]["spec"]
        job_env = {
            **cluster.env,
            "KUBECONFIG": str(
                _token_kubeconfig(cluster, namespace, pod["serviceAccountName"], tmp_path / "job.kubeconfig")
            ),
        }
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            step = subprocess.run(
                [*KIRI, *container["args"]],
                env=job_env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert step.returncode == 0, f"{container['name']}: {step.stderr[-3000:]}"

        def phase() -> str | None:
            md = cluster.get_json("modeldeployment", "rbac", "-n", namespace)
            value = md.get("status", {}).get("phase")
            return value if value in ("Healthy", "Failed", "Degraded") else None

        final = cluster.wait_for(phase, timeout=120, message=f"Healthy\n{log_path.read_text()[-3000:]}")
        assert final == "Healthy", log_path.read_text()[-3000:]
        lease = cluster.get_json("lease", f"{name}-leader", "-n", namespace)["spec"]
        assert lease["holderIdentity"] and lease["leaseDurationSeconds"] == 15
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            exposition = r.read().decode()
        requests = [line for line in exposition.splitlines() if line.startswith("kiri_api_requests_total{")]
        assert requests, exposition[:2000]
        refused = [line for line in requests if re.search(r'code="(401|403)"', line)]
        assert not refused, refused
        # A 403 as httpx logs it ("HTTP/1.1 403 Forbidden"), not any "403" (a timestamp's ",403" ms matched).
        forbidden = [
            line
            for line in log_path.read_text().splitlines()
            if "Forbidden" in line or re.search(r"HTTP/[\d.]+ 403\b", line)
        ]
        assert not forbidden, "\n".join(forbidden)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _snake(obj: Any) -> Any:
    """PodMonitor relabelings (camelCase) as Prometheus relabel_configs (snake_case)."""
    if isinstance(obj, list):
        return [_snake(o) for o in obj]
    if isinstance(obj, dict):
        return {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): _snake(v) for k, v in obj.items()}
    return obj


def test_serving_relabelings_give_analysis_its_labels(
    cluster: Cluster, namespace: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """A real Prometheus applies the chart's relabelings to the real pods' discovery labels.

    Analysis queries select the new revision's series (`revision="$revision"`); those labels come from the
    pods Kiri labels, through these relabelings. Debian's Prometheus is built without Kubernetes service
    discovery, so the pods are read from the API server here and handed to Prometheus through file_sd with
    the `__meta_kubernetes_*` labels its pod role defines. The PodMonitor's selector becomes `keep` rules,
    as the Prometheus Operator generates them.
    """
    import urllib.request

    from .operator_harness import free_port

    docs = render(helm_env, "--set", "metrics.podMonitor.enabled=true", namespace=namespace)
    (monitor,) = by_kind(docs, "PodMonitor")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}

    def pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "containers": [{"name": "serve", "image": "kiri-runtime", "ports": [{"name": "http", "containerPort": 8080}]}],
            },
        }  # fmt: skip

    kiri = {"app.kubernetes.io/managed-by": "kiri", "kiri.dev/modeldeployment": "probe"}
    cluster.apply(
        [
            pod(
                "edge-pod",
                {
                    **kiri,
                    "app.kubernetes.io/component": "edge",
                    "kiri.dev/revision": "abc123",
                    "kiri.dev/adapters": "ad4pt3r5",
                },
            ),
            pod("job-pod", {**kiri, "app.kubernetes.io/component": "compress"}),
            pod("other-pod", {"app": "unrelated"}),
        ]
    )
    node = cluster.wait_for(
        lambda: cluster.get_json("pod", "edge-pod", "-n", namespace)["spec"].get("nodeName"),
        message="edge-pod scheduled",
    )

    def sanitize(name: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", name)

    groups = []
    for p in cluster.get_json("pods", "-n", namespace)["items"]:
        for container in p["spec"]["containers"]:
            for cport in container.get("ports", []):
                meta = {
                    "__meta_kubernetes_namespace": p["metadata"]["namespace"],
                    "__meta_kubernetes_pod_name": p["metadata"]["name"],
                    "__meta_kubernetes_pod_node_name": p["spec"].get("nodeName", ""),
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": cport.get("name", ""),
                    **{
                        f"__meta_kubernetes_pod_label_{sanitize(k)}": v
                        for k, v in p["metadata"]["labels"].items()
                    },
                }
                address = f"{p.get('status', {}).get('podIP') or '127.0.0.1'}:{cport['containerPort']}"
                groups.append({"targets": [address], "labels": meta})
    (tmp_path / "pods.json").write_text(json.dumps(groups))
    selector = monitor["spec"]["selector"]
    keep = [
        {"source_labels": [f"__meta_kubernetes_pod_label_{sanitize(k)}"], "regex": v, "action": "keep"}
        for k, v in selector["matchLabels"].items()
    ] + [
        {"source_labels": [f"__meta_kubernetes_pod_label_{sanitize(e['key'])}"],
         "regex": "|".join(e["values"]), "action": "keep"}
        for e in selector["matchExpressions"]
    ] + [{"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"], "action": "keep"}]  # fmt: skip
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {
                "job_name": "kiri-serving",
                "metrics_path": endpoint["path"],
                "file_sd_configs": [{"files": [str(tmp_path / "pods.json")]}],
                "relabel_configs": keep + _snake(endpoint["relabelings"]),
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def discovered() -> list[dict[str, Any]] | None:
            if prom.poll() is not None:
                raise RuntimeError((tmp_path / "prometheus.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/targets?state=any", timeout=2
                ) as r:
                    data = json.loads(r.read())["data"]
            except OSError:
                return None
            active: list[dict[str, Any]] = data["activeTargets"]
            return active if active and len(data["droppedTargets"]) >= 2 else None

        active = cluster.wait_for(discovered, timeout=60, message="Prometheus discovered the pods")
        assert active is not None
        assert len(active) == 1, active
        labels = active[0]["labels"]
        assert labels["modeldeployment"] == "probe"
        assert labels["revision"] == "abc123"
        assert labels["adapters"] == "ad4pt3r5"  # a site's adapter wave is judged on its adapter revision
        assert labels["component"] == "edge"
        assert labels["node"] == node
        assert labels["namespace"] == namespace
    finally:
        prom.terminate()
        prom.wait(timeout=30)
