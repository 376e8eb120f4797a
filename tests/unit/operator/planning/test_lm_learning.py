"""A language model's learning in the planner: rounds that train a LoRA adapter on the checkpoint itself, wait for a
LoRA-ready variant to export it for, and hand the accepted adapter to the per-site adapter waves."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.conditions import Reason
from kiri_operator.learning_commands import configmap
from kiri_operator.observations import NodeView, ObjectView, Observed
from kiri_operator.planning import federation as F
from kiri_operator.planning import learned_adapters, learning
from kiri_operator.planning.building import Owner
from kiri_runtime.learning import rounds
from kiri_runtime.manifests import LORA_LAYOUT_KEY, Manifest, Variant

SHA = "ab" * 32
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
OWNER = Owner("chat", "ns", "uid-1")
LAYOUT = {
    "format": 1,
    "targets": ["q_proj", "v_proj"],
    "projections": [{"layer": 0, "path": "model.layers.0.attn.qkv_proj", "in": 64, "out": 192, "parts": []}],
}
NODES = (
    NodeView("cloud-0", {"kiri.dev/tier": "cloud"}),
    NodeView("a-0", {"kiri.dev/tier": "edge", "kiri.dev/site": "site-a"}),
    NodeView("b-0", {"kiri.dev/tier": "edge", "kiri.dev/site": "site-b"}),
)


def _spec(
    adapters: list[dict[str, Any]] | None = None,
    source: str = "pvc://models/tiny-llama",
    **learning_extra: Any,
) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "chat",
                "version": "1",
                "source": {"uri": source, "format": "hf", "sha256": SHA},
                "evalDataUri": "file:///data/eval.jsonl",
            },
            "edge": {
                "variants": [{"name": "q4", "method": "int4", "options": {"loraTargets": "q_proj,v_proj"}}],
                "artifacts": {
                    "uri": "file:///var/lib/kiri/artifacts",
                    "fetchUri": "http://kiri-store.kiri-system.svc:8080",
                },
                "adapters": adapters or [],
            },
            "learning": {
                "evalDataUri": "file:///data/held-out.jsonl",
                "siteDataPath": "/var/lib/kiri/site-data/chats.jsonl",
                "rounds": 3,
                "trained": {"rank": 8, "steps": 20, "sequenceLength": 64},
                "schedule": {"intervalSeconds": 3600},
                **learning_extra,
            },
        }
    )


def _record(n: int, before: float, after: float) -> rounds.RoundRecord:
    closed = (NOW - timedelta(minutes=120)).isoformat()
    out = f"/store/ns/chat/learning/rounds/{n:04d}"
    return rounds.RoundRecord(
        round=n,
        status="accepted",
        base_sha256=SHA,
        part={"kind": "adapter"},
        participants=[rounds.Participant(site="site-a", samples=1, upload_bytes=900)],
        eval_before=rounds.Evaluation(loss=before, samples=400),
        eval_after=rounds.Evaluation(loss=after, samples=400),
        privacy=rounds.Privacy(noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, epsilon=1.5 * n),
        model=rounds.Artifact(path=f"{out}/adapter", sha256="cd" * 32, bytes=4096),
        served=rounds.Artifact(path=f"{out}/adapter.onnx_adapter", sha256="ef" * 32, bytes=5000),
        opened_at=closed,
        closed_at=closed,
    )


def _observed(*records: rounds.RoundRecord, status: dict[str, Any] | None = None) -> Observed:
    children = {}
    for r in records:
        name = learning.record_name("chat", r.round)
        cm = configmap("ns", name, learning.record_json(r), r.round, "chat", "uid-1")
        children[("ConfigMap", name)] = ObjectView("ConfigMap", name, cm)
    return Observed("chat", "ns", "uid-1", 1, NOW, status=status or {}, nodes=NODES, children=children)


def _objects(lp: learning.LearningPlan) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in lp.children}


def _run_config(lp: learning.LearningPlan, n: int) -> dict[str, Any]:
    job = _objects(lp)[("Job", learning.round_job_name("chat", n))]
    args = job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    config: dict[str, Any] = json.loads(args[args.index("--run-config-json") + 1])
    return config


def _manifest(*variants: Variant) -> Manifest:
    # Only the variants matter here; the model and baseline are the compressor's, not under test.
    return Manifest.model_construct(variants=list(variants))


def test_the_layout_comes_from_the_first_accepted_lora_ready_variant_of_the_manifest() -> None:
    plain = Variant(name="q8", method="int8", accepted=True, reason="ok")
    ready = Variant(name="q4", method="int4", accepted=True, reason="ok", extra={LORA_LAYOUT_KEY: LAYOUT})
    refused = Variant(name="q3", method="int4", accepted=False, reason="gate", extra={LORA_LAYOUT_KEY: {}})
    assert learned_adapters.lora_layout(None) is None
    assert learned_adapters.lora_layout(_manifest(plain)) == {}
    assert learned_adapters.lora_layout(_manifest(refused, plain, ready)) == LAYOUT


def test_rounds_wait_for_a_lora_ready_variant_and_say_which_wait_it_is() -> None:
    waiting = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={}, layout=None)
    assert waiting.children == []
    assert waiting.condition is not None
    assert (waiting.condition.status, waiting.condition.reason) == (
        "False",
        Reason.WAITING_FOR_LORA_READY_VARIANT,
    )
    none = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={}, layout={})
    assert none.children == [] and none.condition is not None
    assert none.condition.reason == Reason.NO_LORA_READY_VARIANT
    assert "edge.variants[].options.loraTargets" in none.condition.message


def test_a_round_trains_the_adapter_on_the_checkpoint_mounted_read_only_in_the_superlink_and_every_supernode() -> (
    None
):
    lp = learning.plan_learning(_spec(), _observed(), OWNER, variant_sizes={}, layout=LAYOUT)
    assert lp.condition is not None and (lp.condition.status, lp.condition.message) == (
        "True",
        "round 1 running",
    )
    config = _run_config(lp, 1)
    assert config["part"] == "adapter" and config["factory"] == ""
    assert config["base-model"] == f"{learning.BASE_MODEL_MOUNT}/tiny-llama"
    assert (config["adapter-targets"], config["lora-rank"]) == ("q_proj,v_proj", 8)
    assert (config["adapter-steps"], config["adapter-seq-len"], config["ffa"]) == (20, 64, True)
    assert config["weights"] == ""  # round 1 starts from the drawn A and a zero B: the base model's output
    assert json.loads(config["serve-layout"]) == LAYOUT
    assert config["a-seed"] == int(learning.L.short_hash("uid-1", length=7), 16)
    objs = _objects(lp)
    pods = [objs[("Deployment", F.superlink_name("chat"))]] + [
        objs[("Deployment", F.supernode_name("chat", s))] for s in ("site-a", "site-b")
    ]
    for deployment in pods:
        pod = deployment["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "base-model")
        assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "base-model")
        assert (mount["mountPath"], mount["readOnly"]) == (learning.BASE_MODEL_MOUNT, True)


def test_the_next_round_starts_from_the_last_accepted_adapter_in_the_store() -> None:
    spec = _spec(schedule={"intervalSeconds": 60})
    lp = learning.plan_learning(spec, _observed(_record(1, 3.0, 2.5)), OWNER, variant_sizes={}, layout=LAYOUT)
    assert _run_config(lp, 2)["weights"] == "/var/lib/kiri/artifacts/ns/chat/learning/rounds/0001/adapter"


def test_the_accepted_adapter_goes_to_status_with_its_held_out_perplexities_and_no_update_verdict() -> None:
    records = (_record(1, 3.0, 2.5), _record(2, 2.5, 2.25))
    lp = learning.plan_learning(_spec(), _observed(*records), OWNER, variant_sizes={"q4": 10}, layout=LAYOUT)
    assert lp.status is not None
    assert lp.status["adapter"] == {
        "round": 2,
        "uri": "http://kiri-store.kiri-system.svc:8080/ns/chat/learning/rounds/0002/adapter.onnx_adapter",
        "sha256": "ef" * 32,
        "sizeBytes": 5000,
        "heldOut": {
            "metric": "perplexity",
            "base": round(math.exp(3.0), 6),
            "current": round(math.exp(2.5), 6),
            "adapter": round(math.exp(2.25), 6),
        },
    }
    # The per-site adapter waves apply the update policy; the learned-weights verdict is a tensor model's.
    assert "update" not in lp.status and "model" not in lp.status


def test_the_edge_serves_the_learned_adapter_on_every_learning_site_as_their_default() -> None:
    records = (_record(1, 3.0, 2.5),)
    status = learning.plan_learning(
        _spec(), _observed(*records), OWNER, variant_sizes={}, layout=LAYOUT
    ).status
    espec = learning.effective_spec(_spec(), status, ["site-a", "site-b"])
    (adapter,) = espec.edge.adapters
    assert (adapter.name, adapter.sites, adapter.default) == ("learned", ["site-a", "site-b"], True)
    assert (adapter.sha256, adapter.size_bytes) == ("ef" * 32, 5000)
    assert adapter.held_out is not None and adapter.held_out.worse() is False
    assert espec.model == _spec().model  # same checkpoint, same compression and revision
    assert learning.effective_spec(_spec(), {}, ["site-a"]) == _spec()


def test_a_declared_default_adapter_keeps_the_bare_model_name_and_the_learned_one_is_picked_by_name() -> None:
    declared = [
        {
            "name": "legal",
            "uri": "s3://a/legal.onnx_adapter",
            "sha256": SHA,
            "sizeBytes": 9,
            "sites": ["site-a"],
            "default": True,
        }
    ]
    spec = _spec(declared, adapterName="tuned")
    status = learning.plan_learning(
        spec, _observed(_record(1, 3.0, 2.5)), OWNER, variant_sizes={}, layout=LAYOUT
    )
    espec = learning.effective_spec(spec, status.status, ["site-a", "site-b"])
    assert [(a.name, a.default) for a in espec.edge.adapters] == [("legal", True), ("tuned", False)]


def _compressed_world(spec: ModelDeploymentSpec) -> Any:
    """adapter_worlds' simulated API server, its compression manifest published with a LoRA-ready variant."""
    from adapter_worlds import Server, lm_manifest, world

    server = Server(world())
    server.never_ready, server.analysis, server.asked = set(), {}, []
    server.step(spec)
    manifest = lm_manifest()
    manifest.variants[0].extra[LORA_LAYOUT_KEY] = LAYOUT
    server.publish(spec, manifest)
    for _ in range(4):
        server.step(spec)
    return server


def _recorded(server: Any, record: rounds.RoundRecord) -> None:
    """The round Job published `record` (its ConfigMap is in the simulated API server)."""
    from dataclasses import replace

    name = learning.record_name("md", record.round)
    cm = configmap("ns", name, learning.record_json(record), record.round, "md", "uid-1")
    children = {**server.world.children, ("ConfigMap", name): ObjectView("ConfigMap", name, cm)}
    server.world = replace(server.world, children=children)


def test_the_whole_planner_rolls_an_accepted_rounds_adapter_onto_each_learning_sites_nodes() -> None:
    """The planner end to end, on a simulated API server: the manifest's LoRA-ready variant starts round 1; the
    round's record makes every site's edge pods load the learned adapter as their default, through each site's
    own adapter wave (one canary node, then the rest)."""

    from adapter_worlds import (
        SITE_NODES,
        adapters_by_node,
        daemonsets,
        serve_args,
        site,
    )
    from planning_worlds import NOW as WORLD_NOW

    # A checkpoint in the image (file://): the simulated API server has no claims.
    spec = _spec(source="file:///models/tiny-llama", adapterName="tuned")
    spec = spec.model_copy(
        update={
            "rollout": spec.rollout.model_copy(
                update={"stages": [spec.rollout.stages[0].model_copy(update={"nodes": 1, "percent": None})]}
            )
        }
    )
    server = _compressed_world(spec)
    jobs = {name for (kind, name) in server.world.children if kind == "Job"}
    assert learning.round_job_name("md", 1) in jobs, (
        server.world.status.get("conditions"),
        server.world.status.get("learning"),
    )
    assert "adapter" not in server.world.status.get("learning", {})

    record = _record(1, 3.0, 2.5).model_copy(update={"closed_at": WORLD_NOW.isoformat()})
    _recorded(server, record)
    for _ in range(30):
        server.step(spec, dt=10.0)
    status = server.world.status
    assert status["learning"]["adapter"]["round"] == 1
    # The wait's False is gone with the wait: round 2 is due an interval after round 1 closed.
    progressing = next(c for c in status["conditions"] if c["type"] == "LearningProgressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "LearningRound")
    assert progressing["message"].startswith("round 2 of 3 starts at ")
    for site_name, nodes in SITE_NODES.items():
        entry = site(status, site_name)
        assert entry["adapters"] == ["tuned"] and entry["default"] == "tuned", entry
        revision = entry["revision"]
        assert {n: adapters_by_node(server)[n] for n in nodes} == dict.fromkeys(nodes, revision)
    args = {serve_args(body).default_adapter for body in daemonsets(server).values()}
    assert args == {"tuned"}


def _kept_record(n: int, files: dict[str, str]) -> rounds.RoundRecord:
    """A perSite round: every site kept its adapter and reported its digest and perplexities only."""
    closed = (NOW - timedelta(minutes=120)).isoformat()
    return rounds.RoundRecord(
        round=n,
        status="accepted",
        base_sha256=SHA,
        participants=[
            rounds.Participant(
                site=site,
                samples=10,
                upload_bytes=0,
                adapter=rounds.KeptAdapter(
                    file=file,
                    sha256=f"{i + 1}" * 64,
                    bytes=5000 + i,
                    held_out_base_perplexity=20.0,
                    held_out_adapter_perplexity=8.0 + i,
                ),
            )
            for i, (site, file) in enumerate(sorted(files.items()))
        ],
        privacy=rounds.Privacy(noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, epsilon=0.0),
        opened_at=closed,
        closed_at=closed,
    )


def test_a_per_site_supernode_keeps_its_adapters_in_the_node_cache_and_serves_them_read_only_to_its_site() -> (
    None
):
    lp = learning.plan_learning(_spec(policy="perSite"), _observed(), OWNER, variant_sizes={}, layout=LAYOUT)
    objs = _objects(lp)
    for site in ("site-a", "site-b"):
        name = F.supernode_name("chat", site)
        pod = objs[("Deployment", name)]["spec"]["template"]["spec"]
        supernode, store = pod["containers"]
        config = supernode["command"][supernode["command"].index("--node-config") + 1]
        assert f'keep-dir="{F.KEPT_DIR}"' in config
        cache = next(v for v in pod["volumes"] if v["name"] == "cache")
        assert cache["csi"] == {"driver": "cache.kiri.dev", "volumeAttributes": {"model": "chat"}}
        assert {m["name"]: m.get("readOnly", False) for m in supernode["volumeMounts"]}["cache"] is False
        assert store["command"] == [
            "kiri", "store", "--root", F.KEPT_DIR, "--read-only", "--host", "0.0.0.0", "--port", "8080",
        ]  # fmt: skip
        assert [(m["name"], m["readOnly"]) for m in store["volumeMounts"]] == [("cache", True)]
        assert store["securityContext"]["readOnlyRootFilesystem"] is True
        service = objs[("Service", name)]
        labels = objs[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"] == labels  # this site's SuperNode pod, and no other
        assert service["spec"]["ports"] == [{"name": "adapters", "port": 8080, "targetPort": 8080}]
    assert _run_config(lp, 1)["policy"] == "perSite"


def test_each_sites_kept_adapter_goes_to_status_and_only_to_that_sites_edge() -> None:
    spec = _spec(policy="perSite")
    files = {"site-a": "round-0001.onnx_adapter", "site-b": "round-0001.onnx_adapter"}
    first = _kept_record(1, files)
    # Round 2: site b's report names a file that is not the ClientApp's own; site b keeps round 1's.
    second = _kept_record(2, {"site-a": "round-0002.onnx_adapter", "site-b": "../../secrets"})
    lp = learning.plan_learning(spec, _observed(first, second), OWNER, variant_sizes={}, layout=LAYOUT)
    assert lp.status is not None and "adapter" not in lp.status
    kept = {k["site"]: k for k in lp.status["siteAdapters"]}
    assert kept["site-a"] == {
        "site": "site-a",
        "round": 2,
        "uri": f"http://{F.supernode_name('chat', 'site-a')}.ns.svc:8080/round-0002.onnx_adapter",
        "sha256": "1" * 64,
        "sizeBytes": 5000,
        "heldOut": {"metric": "perplexity", "base": 20.0, "adapter": 8.0},
    }
    assert (kept["site-b"]["round"], kept["site-b"]["sha256"]) == (1, "2" * 64)
    espec = learning.effective_spec(spec, lp.status, ["site-a", "site-b"])
    by_site = {a.sites[0]: a for a in espec.edge.adapters}
    assert sorted(by_site) == ["site-a", "site-b"] and all(len(a.sites) == 1 for a in espec.edge.adapters)
    assert {a.name for a in espec.edge.adapters} == {"learned"} and all(
        a.default for a in espec.edge.adapters
    )
    assert by_site["site-b"].uri.endswith("/round-0001.onnx_adapter")


def test_after_the_last_per_site_round_each_site_still_serves_what_it_kept_and_the_superlink_goes() -> None:
    spec = _spec(policy="perSite", rounds=1)
    record = _kept_record(1, {"site-a": "round-0001.onnx_adapter", "site-b": "round-0001.onnx_adapter"})
    lp = learning.plan_learning(spec, _observed(record), OWNER, variant_sizes={}, layout=LAYOUT)
    kinds = sorted(_objects(lp))
    assert kinds == sorted(
        [("Deployment", F.supernode_name("chat", s)) for s in ("site-a", "site-b")]
        + [("Service", F.supernode_name("chat", s)) for s in ("site-a", "site-b")]
        + [("NetworkPolicy", F.supernodes_policy_name("chat"))]
    )
    assert lp.condition is not None and lp.condition.reason == Reason.LEARNING_COMPLETE


def test_per_site_adapters_roll_out_each_on_its_own_site_through_the_whole_planner() -> None:

    from adapter_worlds import SITE_NODES, adapters_by_node, daemonsets, site

    spec = _spec(source="file:///models/tiny-llama", policy="perSite")
    server = _compressed_world(spec)
    record = _kept_record(1, {"site-a": "round-0001.onnx_adapter", "site-b": "round-0001.onnx_adapter"})
    _recorded(server, record)
    for _ in range(30):
        server.step(spec, dt=10.0)
    status = server.world.status
    # The SuperNodes admit the kept-adapter store's port from this model's edge pods, the ones rolled out here.
    policy = server.world.children[("NetworkPolicy", F.supernodes_policy_name("md"))].body
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": F.SITE_STORE_PORT}]
    (peer,) = rule["from"]
    for body in daemonsets(server).values():
        pod_labels = body["spec"]["template"]["metadata"]["labels"]
        assert peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
    revisions = {s: site(status, s)["revision"] for s in SITE_NODES}
    assert revisions["site-a"] != revisions["site-b"]  # same name, each site's own adapter
    for site_name, nodes in SITE_NODES.items():
        assert site(status, site_name)["default"] == "learned"
        assert {adapters_by_node(server)[n] for n in nodes} == {revisions[site_name]}
