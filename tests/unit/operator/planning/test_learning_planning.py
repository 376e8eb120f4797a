"""planning/learning.py: round Jobs on the right nodes, round records into status, learned revisions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kiri_operator import labels as L
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.learning_commands import configmap
from kiri_operator.observations import NodeView, ObjectView, Observed
from kiri_operator.planning import Settings, learning, plan
from kiri_operator.planning import building as B
from kiri_operator.planning import federation as F
from kiri_operator.planning.building import Owner
from kiri_operator.planning.revisions import compression_key
from kiri_operator.plans import SECRET_SUPERNODE_KEY, SECRET_TLS, Check
from kiri_runtime.learning import rounds

SHA = "ab" * 32
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
OWNER = Owner("md", "ns", "uid-1")


def _spec(**learning_extra: Any) -> ModelDeploymentSpec:
    rollout = learning_extra.pop("rollout", {})
    return ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "m",
                "version": "1",
                "source": {"uri": "file:///models/m.onnx", "sha256": SHA},
                "evalDataUri": "file:///data/inputs.npz",
            },
            "edge": {
                "variants": [{"name": "int8", "method": "int8-dynamic"}],
                "artifacts": {"uri": "file:///store"},
            },
            "rollout": rollout,
            "learning": {
                "trainable": {
                    "factory": "models.net:make",
                    "weightsUri": "file:///models/v1.pt",
                    "weightsSha256": SHA,
                },
                "evalDataUri": "file:///data/held-out.npz",
                "rounds": 3,
                "minClients": 2,
                "schedule": {"intervalSeconds": 3600},
                **learning_extra,
            },
        }
    )


NODES = (
    NodeView("cloud-0", {"kiri.dev/tier": "cloud"}, allocatable={"nvidia.com/gpu": "1", "memory": "64Gi"}),
    NodeView("a-0", {"kiri.dev/tier": "edge", "kiri.dev/site": "site-a"}),
    NodeView("a-1", {"kiri.dev/tier": "edge", "kiri.dev/site": "site-a"}),
    NodeView("b-0", {"kiri.dev/tier": "edge", "kiri.dev/site": "site-b"}),
    NodeView("x-0", {"kiri.dev/tier": "edge"}),  # no site label: takes no part
)


def _record(
    n: int,
    status: str = "accepted",
    before: float = 0.5,
    after: float = 0.7,
    minutes_ago: int = 120,
    weights_file: str = rounds.WEIGHTS_FILE,
) -> rounds.RoundRecord:
    closed = (NOW - timedelta(minutes=minutes_ago)).isoformat()
    return rounds.RoundRecord(
        round=n,
        status=status,
        reason="" if status == "accepted" else "why",
        base_sha256=SHA,
        participants=[rounds.Participant(site="site-a", samples=10, upload_bytes=500)],
        skipped=[
            rounds.SkippedSite(
                site="site-b", reason="no update by the close of the round (offline or straggler)"
            )
        ],
        eval_before=rounds.Evaluation(loss=1.0, accuracy=before, samples=100),
        eval_after=rounds.Evaluation(loss=0.8, accuracy=after, samples=100) if status == "accepted" else None,
        privacy=rounds.Privacy(
            noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, epsilon=4.7 * n, per_site={"site-a": 4.7 * n}
        ),
        model=rounds.Artifact(
            path=f"/store/ns/md/learning/rounds/{n:04d}/{weights_file}", sha256="cd" * 32, bytes=100
        )
        if status == "accepted"
        else None,
        opened_at=closed,
        closed_at=closed,
    )


def _observed(*records: rounds.RoundRecord, status: dict[str, Any] | None = None) -> Observed:
    children = {}
    for r in records:
        cm = configmap(
            "ns", learning.record_name("md", r.round), learning.record_json(r), r.round, "md", "uid-1"
        )
        children[("ConfigMap", cm["metadata"]["name"])] = ObjectView("ConfigMap", cm["metadata"]["name"], cm)
    return Observed("md", "ns", "uid-1", 1, NOW, status=status or {}, nodes=NODES, children=children)


def _by_name(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == "Job"}


def _run_config(lp: learning.LearningPlan, n: int, attempt: int = 1) -> dict[str, Any]:
    """The Flower run config round n's Job submits (`kiri learn-round --run-config-json`)."""
    job = _by_name(lp.children)[learning.round_job_name("md", n, attempt)]
    args = job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    config: dict[str, Any] = json.loads(args[args.index("--run-config-json") + 1])
    return config


def _kinds(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _assert_locked_down(pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}


def test_first_round_runs_a_superlink_in_the_cloud_one_pinned_supernode_per_site_and_the_round_job() -> None:
    lp = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={})
    objs = _kinds(lp.children)
    link = objs[("Deployment", F.superlink_name("md"))]
    pod = link["spec"]["template"]["spec"]
    _assert_locked_down(pod)
    assert pod["nodeSelector"] == {"kiri.dev/tier": "cloud"}
    cmd = pod["containers"][0]["command"]
    assert cmd[:2] == ["kiri", "flower-superlink"] and "--insecure" not in cmd
    assert {cmd[cmd.index(f) + 1] for f in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")} == {
        f"{F.TLS_MOUNT}/ca.crt",
        f"{F.TLS_MOUNT}/tls.crt",
        f"{F.TLS_MOUNT}/tls.key",
    }
    assert "--disable-runtime-dependency-installation" in cmd
    assert [cmd[cmd.index(f) + 1] for f in ("--host", "--port", "--control-port")] == [
        "0.0.0.0",
        "9092",
        "9093",
    ]
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "md-flower-tls"
    # The ServerApp runs in this pod and writes the privacy ledger ConfigMap: the one API token is here.
    assert {v["name"] for v in pod["volumes"]} >= {"tls", "artifacts", B.api_token_volume()["name"]}
    assert ("Service", F.superlink_name("md")) in objs
    for site in ("site-a", "site-b"):
        node = objs[("Deployment", F.supernode_name("md", site))]
        npod = node["spec"]["template"]["spec"]
        _assert_locked_down(npod)
        assert npod["nodeSelector"] == {"kiri.dev/tier": "edge", "kiri.dev/site": site}
        ncmd = npod["containers"][0]["command"]
        assert ncmd[ncmd.index("--superlink") + 1] == "md-superlink.ns.svc:9092"
        assert ncmd[ncmd.index("--root-certificates") + 1] == f"{F.TLS_MOUNT}/ca.crt"
        assert ncmd[ncmd.index("--node-config") + 1] == (
            f'site="{site}" data="/var/lib/kiri/site-data.npz" work-dir="/tmp/kiri-learning"'
        )
        secret = next(v for v in npod["volumes"] if v["name"] == "tls")["secret"]
        assert secret["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never the SuperLink's key
        data = next(v for v in npod["volumes"] if v["name"] == "site-data")
        assert data["hostPath"] == {"path": "/var/lib/kiri/site-data/train.npz", "type": "File"}
        mount = next(m for m in npod["containers"][0]["volumeMounts"] if m["name"] == "site-data")
        assert mount["readOnly"] is True
    job = objs[("Job", learning.round_job_name("md", 1))]
    jpod = job["spec"]["template"]["spec"]
    _assert_locked_down(jpod)
    args = jpod["initContainers"][0]["args"]
    # The Control API's port: the SuperNodes' (9092) serves no Control API (`kiri flower-superlink --control-port`).
    assert args[0] == "learn-round" and args[args.index("--superlink") + 1] == "md-superlink.ns.svc:9093"
    # A refused or skipped round's record is published too (the command's exit 3 would fail the Job first).
    assert "--any-record-succeeds" in args
    config = json.loads(args[args.index("--run-config-json") + 1])
    assert config["sites"] == "site-a,site-b" and config["round"] == 1
    assert config["weights"] == "/models/v1.pt" and config["secure-aggregation"] is True
    assert config["ledger"] == f"configmap:ns/{learning.ledger_name('md')}"
    assert jpod["containers"][0]["args"][0] == "publish-round"
    tls = lp.secrets[0]
    assert tls.name == "md-flower-tls" and tls.kind == SECRET_TLS
    assert tls.names == (
        "md-superlink.ns.svc",
        "md-superlink.ns.svc.cluster.local",
        "md-superlink",
        "localhost",
        "127.0.0.1",  # the ServerApp reaches the SuperLink's Runtime API in its own pod
    )
    assert lp.status is not None and lp.status["activeRound"] == 1 and lp.status["roundsCompleted"] == 0


def _pod(lp: learning.LearningPlan, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = _kinds(lp.children)[("Deployment", name)]["spec"]["template"]["spec"]
    return pod


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(v for v in pod["volumes"] if v["name"] == name)
    return found


def _secrets_mounted(pod: dict[str, Any]) -> dict[str, list[str]]:
    """Secret name -> the keys of it the pod can read, over plain and projected volumes."""
    out: dict[str, list[str]] = {}
    for v in pod["volumes"]:
        sources = (
            [v] if "secret" in v else [s for s in v.get("projected", {}).get("sources", []) if "secret" in s]
        )
        for source in sources:
            secret = source["secret"]
            name = secret.get("secretName") or secret["name"]
            assert "items" in secret or name == "md-flower-tls", f"{name}: every key of it mounted"
            out.setdefault(name, []).extend(i["key"] for i in secret.get("items", [{"key": "*"}]))
    return out


def test_each_site_gets_its_own_key_secret_requested_by_name_with_no_key_material_in_the_plan() -> None:
    lp = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={})
    keys = [s for s in lp.secrets if s.kind == SECRET_SUPERNODE_KEY]
    assert [(s.namespace, s.name, s.owner_uid) for s in keys] == [
        ("ns", F.node_key_secret_name("md", "site-a"), "uid-1"),
        ("ns", F.node_key_secret_name("md", "site-b"), "uid-1"),
    ]
    assert F.node_key_secret_name("md", "site-a") != F.node_key_secret_name("md", "site-b")
    assert all(s.names == () for s in keys)
    # The plan goes to the reconciler: no key material in it, only names (made at the create).
    whole = plan(_spec(), _observed(), Settings())
    assert [s.name for s in whole.secrets] == ["md-flower-tls", *(s.name for s in keys)]
    assert "PRIVATE KEY" not in json.dumps([a.body for a in whole.actions if a.body is not None])


def test_a_supernode_signs_with_its_own_sites_private_key_and_mounts_no_other_key() -> None:
    lp = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={})
    for site in ("site-a", "site-b"):
        pod = _pod(lp, F.supernode_name("md", site))
        cmd = pod["containers"][0]["command"]
        assert (
            cmd[cmd.index("--auth-supernode-private-key") + 1] == "/var/run/kiri/supernode-key/supernode.key"
        )
        assert _secrets_mounted(pod) == {
            "md-flower-tls": ["ca.crt"],
            F.node_key_secret_name("md", site): ["supernode.key"],
        }
        key = _volume(pod, "supernode-key")["secret"]
        assert key["items"] == [{"key": "supernode.key", "path": "supernode.key"}]
        assert key["defaultMode"] == 0o440  # readable by the pod's group (fsGroup), no one else
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "supernode-key")
        assert mount == {"name": "supernode-key", "mountPath": F.NODE_KEY_MOUNT, "readOnly": True}


def test_the_superlink_turns_supernode_auth_on_and_mounts_only_the_sites_public_keys() -> None:
    lp = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={})
    pod = _pod(lp, F.superlink_name("md"))
    cmd = pod["containers"][0]["command"]
    assert "--enable-supernode-auth" in cmd
    assert cmd[cmd.index("--supernode-public-keys") + 1] == F.NODE_KEYS_MOUNT
    assert _secrets_mounted(pod) == {
        "md-flower-tls": ["*"],  # the SuperLink's own certificate and key
        F.node_key_secret_name("md", "site-a"): ["supernode.pub"],
        F.node_key_secret_name("md", "site-b"): ["supernode.pub"],
    }
    sources = _volume(pod, "supernode-keys")["projected"]["sources"]
    assert [s["secret"]["items"] for s in sources] == [
        [{"key": "supernode.pub", "path": "site-a.pub"}],
        [{"key": "supernode.pub", "path": "site-b.pub"}],
    ]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "supernode-keys")
    assert mount == {"name": "supernode-keys", "mountPath": F.NODE_KEYS_MOUNT, "readOnly": True}


def test_a_site_that_leaves_the_spec_is_no_longer_registered_on_the_superlink() -> None:
    observed = _observed()
    observed = Observed(
        "md", "ns", "uid-1", 1, NOW, status={}, nodes=tuple(n for n in NODES if not n.name.startswith("b-"))
    )
    lp = learning.plan_learning(_spec(), observed, OWNER, variant_sizes={})
    pod = _pod(lp, F.superlink_name("md"))
    assert [
        s["secret"]["items"][0]["path"] for s in _volume(pod, "supernode-keys")["projected"]["sources"]
    ] == ["site-a.pub"]
    assert [s.name for s in lp.secrets if s.kind == SECRET_SUPERNODE_KEY] == [
        F.node_key_secret_name("md", "site-a")
    ]


def test_a_round_over_fewer_sites_leaves_the_superlinks_pod_and_its_registered_sites_as_they_were() -> None:
    between = learning.plan_learning(
        _spec(clientsPerRound=1, minClients=1), _observed(_record(1, minutes_ago=1)), OWNER, variant_sizes={}
    )
    during = learning.plan_learning(
        _spec(clientsPerRound=1, minClients=1), _observed(), OWNER, variant_sizes={}
    )
    name = F.superlink_name("md")
    assert _pod(during, name) == _pod(between, name)  # no SuperLink restart when a round starts
    assert [
        s["secret"]["items"][0]["path"]
        for s in _volume(_pod(during, name), "supernode-keys")["projected"]["sources"]
    ] == ["site-a.pub", "site-b.pub"]
    assert ("Deployment", F.supernode_name("md", "site-b")) not in _kinds(during.children)


def test_between_rounds_the_federation_stays_up_and_no_round_job_is_wanted() -> None:
    lp = learning.plan_learning(_spec(), _observed(_record(1, minutes_ago=1)), OWNER, variant_sizes={})
    kinds = sorted(k for k, _ in _kinds(lp.children))
    assert kinds == ["Deployment", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy", "Service"]


def test_trimmed_mean_with_secure_aggregation_is_refused_and_says_what_to_set() -> None:
    with pytest.raises(ValueError, match="trimmed-mean needs each site's update in the clear"):
        _spec(aggregation="trimmed-mean")
    spec = _spec(aggregation="trimmed-mean", secureAggregation=False)
    lp = learning.plan_learning(spec, _observed(), OWNER, variant_sizes={})
    node = _kinds(lp.children)[("Deployment", F.supernode_name("md", "site-a"))]
    cmd = node["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--node-config") + 1].endswith(" allow-plain-rounds=true")


def test_a_recorded_round_goes_to_status_and_the_next_waits_for_the_interval() -> None:
    lp = learning.plan_learning(_spec(), _observed(_record(1, minutes_ago=10)), OWNER, variant_sizes={})
    assert not [o for o in lp.children if o["kind"] == "Job"]
    assert ("ConfigMap", learning.record_name("md", 1)) in lp.keep
    assert lp.status is not None
    (r,) = lp.status["rounds"]
    assert r["outcome"] == "Accepted" and r["participants"] == ["site-a"] and r["accuracy"] == 0.7
    assert r["skipped"] == [
        {"site": "site-b", "reason": "no update by the close of the round (offline or straggler)"}
    ]
    assert lp.status["nextRoundAt"] == "2026-01-01T12:50:00Z"
    assert lp.requeue_after == 3000
    # Round 2 starts from round 1's published weights once the interval has passed.
    lp = learning.plan_learning(_spec(), _observed(_record(1, minutes_ago=61)), OWNER, variant_sizes={})
    assert _run_config(lp, 2)["weights"] == "/store/ns/md/learning/rounds/0001/weights.safetensors"


def test_a_round_published_as_a_torch_file_by_an_older_aggregator_keeps_its_name() -> None:
    spec = _spec(rollout={"updatePolicy": {"minImprovement": 0.1}})
    old = _record(1, minutes_ago=61, weights_file="weights.pt")
    lp = learning.plan_learning(spec, _observed(old), OWNER, variant_sizes={"int8": 1000})
    assert _run_config(lp, 2)["weights"] == "/store/ns/md/learning/rounds/0001/weights.pt"
    assert lp.status is not None
    assert lp.status["model"]["uri"] == "file:///store/ns/md/learning/rounds/0001/weights.pt"


def test_a_round_record_naming_another_file_still_points_at_the_round_weights() -> None:
    odd = _record(1, minutes_ago=61, weights_file="../../elsewhere.bin")
    assert (
        learning.weights_uri(_spec(), OWNER, odd)
        == "file:///store/ns/md/learning/rounds/0001/weights.safetensors"
    )


def test_no_rounds_after_a_refusal_or_the_last_round() -> None:
    refused = learning.plan_learning(
        _spec(), _observed(_record(1), _record(2, "refused", minutes_ago=90)), OWNER, variant_sizes={}
    )
    assert not refused.children
    done = learning.plan_learning(
        _spec(), _observed(_record(1), _record(2), _record(3, minutes_ago=90)), OWNER, variant_sizes={}
    )
    assert not done.children and done.status is not None and done.status["roundsCompleted"] == 3


def test_the_update_policy_defers_a_round_that_does_not_improve_enough() -> None:
    spec = _spec(rollout={"updatePolicy": {"minImprovement": 0.5}})
    lp = learning.plan_learning(
        spec, _observed(_record(1, minutes_ago=10)), OWNER, variant_sizes={"int8": 1000}
    )
    assert lp.status is not None
    assert lp.status["update"]["allowed"] is False
    assert lp.status["update"]["reason"] == "minImprovement: held-out gain +0.2000 is below 0.5"
    assert "model" not in lp.status
    assert any(e.reason == "LearnedModelDeferred" for e in lp.events)


def test_an_allowed_round_becomes_a_new_revision_built_from_the_learned_weights() -> None:
    spec = _spec(rollout={"updatePolicy": {"minImprovement": 0.1, "maxBytesPerDay": 10_000}})
    lp = learning.plan_learning(
        spec, _observed(_record(1, minutes_ago=10)), OWNER, variant_sizes={"int8": 1000}
    )
    assert lp.status is not None and lp.status["update"]["allowed"] is True
    model = lp.status["model"]
    assert (
        model["round"] == 1 and model["uri"] == "file:///store/ns/md/learning/rounds/0001/weights.safetensors"
    )
    assert {d["site"]: d["bytes"] for d in lp.status["downloads"]} == {"site-a": 2000, "site-b": 1000}

    learned = learning.effective_spec(spec, lp.status)
    assert learned.model.version == "1-fl1" and learned.model.source.sha256 == "cd" * 32
    assert compression_key(learned, "file:///store") != compression_key(spec, "file:///store")
    # Through the whole planner: a compression Job for the learned weights, the cloud still on spec.model.
    # The admin allowed this test's host store (file:///store) and site data.
    allowed = Settings(host_store_roots=("/store", "/var/lib/kiri/site-data"))
    p = plan(spec, _observed(_record(1, minutes_ago=10), status={"learning": lp.status}), allowed)
    jobs = [a.body for a in p.actions if a.check is Check.CREATE and a.kind == "Job" and a.body]
    compress = next(j for j in jobs if j["metadata"]["labels"].get(L.COMPONENT) == L.COMPONENT_COMPRESS)
    cargs = compress["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert cargs[cargs.index("--source") + 1] == "models.net:make"
    assert (
        cargs[cargs.index("--state-dict") + 1]
        == "file:///store/ns/md/learning/rounds/0001/weights.safetensors"
    )
    assert cargs[cargs.index("--model-version") + 1] == "1-fl1"
    assert p.status["learning"]["model"]["round"] == 1
    cloud = next(a.body for a in p.actions if a.kind == "Deployment" and a.body)
    assert "file:///models/m.onnx" in str(cloud)


def test_a_second_round_within_the_bandwidth_window_is_deferred() -> None:
    spec = _spec(rollout={"updatePolicy": {"maxBytesPerDay": 2500}})
    first = learning.plan_learning(
        spec, _observed(_record(1, minutes_ago=90)), OWNER, variant_sizes={"int8": 1000}
    )
    assert first.status is not None and first.status["update"]["allowed"]
    later = NOW + timedelta(hours=1)
    obs = _observed(_record(1, minutes_ago=90), _record(2, minutes_ago=5), status={"learning": first.status})
    obs = Observed(
        obs.name, obs.namespace, obs.uid, 1, later, status=obs.status, nodes=NODES, children=obs.children
    )
    lp = learning.plan_learning(spec, obs, OWNER, variant_sizes={"int8": 1000})
    assert lp.status is not None
    assert lp.status["update"]["allowed"] is False
    assert lp.status["update"]["reason"].startswith(
        "maxBytesPerDay: site site-a downloaded 2000 bytes in 24h"
    )
    assert lp.status["update"]["retryAfterSeconds"] == 23 * 3600
    assert lp.status["model"]["round"] == 1  # the adopted model stays until a new one is allowed


def test_a_deferral_is_steady_later_reconciles_change_nothing_and_say_nothing() -> None:
    spec = _spec(rollout={"updatePolicy": {"minImprovement": 0.5}})
    first = learning.plan_learning(spec, _observed(_record(1, minutes_ago=10)), OWNER, variant_sizes={})
    assert first.status is not None and [e.reason for e in first.events] == ["LearnedModelDeferred"]
    obs = _observed(_record(1, minutes_ago=10), status={"learning": first.status})
    later = Observed(
        obs.name,
        obs.namespace,
        obs.uid,
        1,
        NOW + timedelta(minutes=7),
        status=obs.status,
        nodes=NODES,
        children=obs.children,
    )
    again = learning.plan_learning(spec, later, OWNER, variant_sizes={})
    assert again.status is not None and again.status["update"] == first.status["update"]
    assert again.events == []


def _failed(observed: Observed, name: str) -> Observed:
    from dataclasses import replace as dc_replace

    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": "ns", "labels": {}},
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "pod failed",
                }
            ]
        },
    }
    return dc_replace(observed, children={**observed.children, ("Job", name): ObjectView("Job", name, body)})


def test_a_failed_aggregation_says_why_and_retries_the_round_with_new_jobs_after_a_backoff() -> None:
    from dataclasses import replace as dc_replace

    pass

    world = _failed(_observed(), learning.round_job_name("md", 1))
    lp = learning.plan_learning(_spec(), world, OWNER, variant_sizes={})
    assert lp.condition is not None
    assert (lp.condition.type, lp.condition.status, lp.condition.reason) == (
        "LearningProgressing",
        "False",
        "AggregationFailed",
    )
    assert "round 1 attempt 1 failed (BackoffLimitExceeded: pod failed)" in lp.condition.message
    assert [(e.type, e.reason) for e in lp.events] == [("Warning", "AggregationFailed")]
    assert _by_name(lp.children) == {}  # the failed attempt's Job is not desired while it waits
    assert lp.status is not None
    retry = lp.status["retry"]
    delay = learning.retry_delay("uid-1", 1, 1)
    assert 15 <= delay <= 30 and lp.requeue_after == pytest.approx(round(delay), abs=1)
    # The same failure seen again changes nothing: no second event, the same retry time.
    again = learning.plan_learning(
        _spec(), dc_replace(world, status={"learning": lp.status}), OWNER, variant_sizes={}
    )
    assert again.events == [] and again.status is not None and again.status["retry"] == retry
    # After the backoff: attempt 2, under new names.
    later = dc_replace(world, status={"learning": lp.status}, now=NOW + timedelta(seconds=31))
    lp2 = learning.plan_learning(_spec(), later, OWNER, variant_sizes={})
    names = set(_by_name(lp2.children))
    assert learning.round_job_name("md", 1, 2) in names and learning.round_job_name("md", 1) not in names
    assert lp2.condition is not None and (lp2.condition.status, lp2.condition.reason) == (
        "True",
        "AggregationRetrying",
    )
    assert lp2.status is not None and lp2.status["retry"]["attempt"] == 2
    # Its second failure waits longer.
    assert learning.retry_delay("uid-1", 1, 2) > 30


def test_the_aggregator_writes_its_privacy_spend_to_a_configmap_ledger_the_operator_keeps_and_reports() -> (
    None
):
    from kiri_runtime.learning import ledgers

    lp = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={})
    config = _run_config(lp, 1)
    assert config["ledger"] == "configmap:ns/md-learning-ledger"
    assert config["ledger-factory"] == "kiri_operator.learning_commands:register_ledger"
    assert ("ConfigMap", "md-learning-ledger") in lp.keep
    # A spend with no round record (the aggregation crashed) still shows in epsilonSpent.
    text = ledgers.render([ledgers.entry(1, ["site-a"], {"site-a": 1.25})])
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "md-learning-ledger"},
        "data": {"ledger.json": text},
    }
    world = _observed()
    from dataclasses import replace as dc_replace

    world = dc_replace(
        world,
        children={
            **world.children,
            ("ConfigMap", "md-learning-ledger"): ObjectView("ConfigMap", "md-learning-ledger", cm),
        },
    )
    lp = learning.plan_learning(_spec(), world, OWNER, variant_sizes={})
    assert lp.status is not None and lp.status["epsilonSpent"] == 1.25


def test_the_configmap_ledger_appends_under_the_resource_version_and_rereads_on_a_conflict() -> None:
    from kiri_operator.kube import KubeError
    from kiri_operator.learning_commands import ConfigMapLedger

    class ApiStandIn:
        def __init__(self) -> None:
            self.cm: dict[str, Any] | None = None
            self.version = 0
            self.conflicts = 1  # another writer got in between once

        def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
            return self.cm

        def apply(self, body: dict[str, Any]) -> dict[str, Any]:
            if (
                self.cm is not None
                and body["metadata"].get("resourceVersion") != self.cm["metadata"]["resourceVersion"]
            ):
                raise KubeError(409, "apply", "ConfigMap", "conflict")
            if self.conflicts and self.cm is not None:
                self.conflicts -= 1
                self.version += 1
                self.cm["metadata"]["resourceVersion"] = f"v{self.version}"
                raise KubeError(409, "apply", "ConfigMap", "conflict")
            self.version += 1
            self.cm = {**body, "metadata": {**body["metadata"], "resourceVersion": f"v{self.version}"}}
            return self.cm

    api = ApiStandIn()
    ledger = ConfigMapLedger(api, "ns", "md-learning-ledger", "md", "uid-1")
    ledger.spend(1, ["site-a", "site-b"], {"site-a": 0.5, "site-b": 0.5})
    ledger.spend(1, ["site-a"], {"site-a": 0.7})  # the retried round 1
    assert ledger.spent() == {"site-a": 2, "site-b": 1}
    assert api.cm is not None and api.cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert api.cm["metadata"]["labels"]["app.kubernetes.io/component"] == "learning-ledger"


def test_site_data_outside_the_admins_host_stores_starts_no_round_and_says_why():
    allowed = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={})
    assert [c for c in allowed.children if c["kind"] == "Job"]
    refused = learning.plan_learning(
        _spec(siteDataPath="/etc/shadow"), _observed(), OWNER, variant_sizes={}, settings=Settings()
    )
    assert refused.children == []
    assert refused.condition is not None
    assert (refused.condition.type, refused.condition.status, refused.condition.reason) == (
        "LearningProgressing",
        "False",
        "HostPathNotAllowed",
    )
    assert refused.condition.message.startswith("learning.siteDataPath '/etc/shadow' is a host path outside")


def test_round_jobs_mount_an_api_token_only_where_they_write_configmaps() -> None:
    lp = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={})
    objs = _by_name(lp.children)
    pod = objs[learning.round_job_name("md", 1)]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kiri-compressor"
    assert pod["automountServiceAccountToken"] is False
    with_token = {
        c["name"]
        for c in pod["initContainers"] + pod["containers"]
        if any(m["name"] == "kube-api-access" for m in c["volumeMounts"])
    }
    # publish writes the round record; the ServerApp, in the SuperLink's pod, writes the privacy ledger.
    assert with_token == {"publish"}
    kinds = _kinds(lp.children)
    link = kinds[("Deployment", F.superlink_name("md"))]["spec"]["template"]["spec"]
    assert any(v["name"] == "kube-api-access" for v in link["volumes"])
    for site in ("site-a", "site-b"):
        npod = kinds[("Deployment", F.supernode_name("md", site))]["spec"]["template"]["spec"]
        assert npod["automountServiceAccountToken"] is False
        assert not [v for v in npod["volumes"] if v["name"] == "kube-api-access"]


def test_the_operator_made_role_names_the_ledger_and_the_active_round_record() -> None:
    from kiri_operator.planning import Settings

    s = _spec()
    p = plan(s, _observed(), Settings(create_compressor_rbac=True))
    role = next(a.body for a in p.actions if a.kind == "Role")
    assert role is not None
    named = role["rules"][1]["resourceNames"]
    assert named == sorted(
        [
            L.manifest_name("md", compression_key(B.with_default_store(s, None), B.store_uri(s))),
            learning.ledger_name("md"),
            learning.record_name("md", 1),
        ]
    )
    assert role["rules"][0] == {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}


def test_a_per_site_policy_runs_the_same_federation_and_asks_the_round_for_metrics_only() -> None:
    lp = learning.plan_learning(_spec(policy="perSite"), _observed(), OWNER, variant_sizes={})
    assert _run_config(lp, 1)["policy"] == "perSite"
    assert _run_config(learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={}), 1)[
        "policy"
    ] == ("federated")
    # A perSite round publishes no model: nothing to adopt, the edge stays on spec.model.
    record = _record(1, minutes_ago=1).model_copy(update={"model": None})
    lp = learning.plan_learning(_spec(policy="perSite"), _observed(record), OWNER, variant_sizes={})
    assert lp.status is not None and "model" not in lp.status and "update" not in lp.status


def test_every_key_of_the_operators_run_config_is_one_the_flower_app_declares_and_the_apps_accept() -> None:
    from kiri_runtime.learning import launching
    from kiri_runtime.learning.settings import RoundSettings

    config = _run_config(learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={}), 1)
    assert set(config) <= set(launching.DEFAULTS)  # `flwr run --run-config` refuses undeclared keys
    settings = RoundSettings.from_run_config(config)
    assert (settings.round, settings.sites, settings.min_clients) == (1, ("site-a", "site-b"), 2)
    assert settings.secure_aggregation is True and settings.target_epsilon == 8.0
