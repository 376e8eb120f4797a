"""Federated learning rounds as Jobs, their records as status, and learned models as revisions. Pure.

Per round N (due `schedule.intervalSeconds` after the previous round closed):
- an aggregator Job on a cloud node (`kiri aggregate`, one round, its ledger in the artifact store) and a
  Service in front of it, then `kiri publish-round` writes the round record to a ConfigMap;
- one trainer Job per edge site (`kiri train-edge`), pinned to that site's nodes by `siteLabel`, with the site
  data mounted read-only from the host and the site's token from the Secret `<md>-learning-tokens`.
Round N's Jobs stop being desired once its record exists, so they are garbage-collected; records are kept.

The newest accepted round is a candidate for the update policy (planning/updating.py). Once allowed, it is
*adopted* (kept in `status.learning.model`, so the choice is sticky) and `effective_spec` swaps the edge's
model source for the learned weights: a new compression key and revision that goes through compression, gates
and waves like any other. The cloud keeps serving `spec.model` (it serves ONNX; the learned weights are a
safetensors state dict, `rounds/<NNNN>/weights.safetensors`, that the compressor exports).

A round whose aggregator Job failed (no record will come) is retried under new Job names after a backoff,
with `LearningProgressing=False/AggregationFailed` and a Warning until then; the spend of the failed attempt
is already in the privacy ledger ConfigMap the aggregator writes before it accepts anything.

Why one module: a round's Jobs, its record, its retry and the update policy on its result read the same
records and status; split, each half would re-derive the round number and the records from the other's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

from pydantic import ValidationError

from kiri_operator import labels as L
from kiri_operator.api.scalars import format_time
from kiri_operator.api.specs import ModelDeploymentSpec, ModelSource
from kiri_operator.conditions import Condition, Reason
from kiri_operator.observations import Observed
from kiri_operator.planning import building as B
from kiri_operator.planning import federation as F
from kiri_operator.planning.learned_adapters import (
    adapter_status,
    keeps_site_adapters,
    kept_status,
    learns_adapter,
    with_learned_adapters,
)
from kiri_operator.planning.settings import Settings
from kiri_operator.planning.updating import Candidate, Download, decide
from kiri_operator.plans import Event, SecretRequest
from kiri_runtime.learning.rounds import RECORD_FILE, WEIGHTS_FILE, RoundRecord

# The operator's ConfigMap ledger, which the ServerApp loads by name (the runtime never imports the operator).
LEDGER_FACTORY = "kiri_operator.learning_commands:register_ledger"
DEFAULT_DELTA = 1e-5
ROUNDS_KEPT = 10
# A language model's round: where its pods read the checkpoint (a pvc:// source is mounted there), and the
# names the ServerApp writes an accepted adapter under (kiri_runtime/learning/adapter_rounds.py, which
# imports numpy: the operator spells them here).
BASE_MODEL_MOUNT = "/base-model"
ADAPTER_DIR = "adapter"
_SLUG = re.compile(r"[^a-z0-9-]+")


def _round_key(n: int, attempt: int) -> str:
    # A retried round gets new Job names: a failed Job cannot be rerun, and its pods stay for inspection.
    return f"learn-r{n}" if attempt <= 1 else f"learn-r{n}a{attempt}"


def round_job_name(md: str, n: int, attempt: int = 1) -> str:
    return L.child_name(md, _round_key(n, attempt), "agg")


def ledger_name(md: str) -> str:
    return L.child_name(md, "learning-ledger")


LEARNING_PROGRESSING = "LearningProgressing"
RETRY_BASE_SECONDS = 30.0
RETRY_MAX_SECONDS = 600.0


def retry_delay(uid: str, n: int, attempt: int) -> float:
    """Seconds before attempt `attempt + 1` of round `n`: doubling from 30 s up to 10 min, with a jitter
    (a hash, so the pure planner gives the same answer on every reconcile) of up to half of it."""
    ceiling = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2.0 ** (attempt - 1))
    fraction = int(L.short_hash(f"{uid}/{n}/{attempt}", length=4), 16) / 0xFFFF
    return ceiling / 2 + fraction * ceiling / 2


def job_failure(observed: Observed, name: str) -> str | None:
    """Why the Job `name` failed (its Failed condition), or None while it has not."""
    job = observed.child("Job", name)
    if job is None:
        return None
    for cond in (job.body.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return f"{cond.get('reason') or 'Failed'}: {cond.get('message') or 'the aggregator Job failed'}"
    return None


def ledger_epsilon(observed: Observed, md: str) -> float:
    """The largest epsilon any site reached in the ledger ConfigMap (spends of rounds with no record too)."""
    from kiri_runtime.learning.errors import LearningError
    from kiri_runtime.learning.ledgers import LEDGER_KEY, parse

    cm = observed.child("ConfigMap", ledger_name(md))
    if cm is None:
        return 0.0
    try:
        spends = parse((cm.body.get("data") or {}).get(LEDGER_KEY))
    except LearningError:
        return 0.0
    return max((float(e) for s in spends for e in (s.get("epsilon") or {}).values()), default=0.0)


def record_name(md: str, n: int) -> str:
    return L.child_name(md, f"learn-r{n}", "record")


def store_rel(owner: B.Owner) -> str:
    return f"{owner.namespace}/{owner.name}/learning"


# Rounds published before the weights became safetensors keep their torch file; the trainers and the
# compressor read either.
_WEIGHTS_NAMES = (WEIGHTS_FILE, "weights.pt")


def weights_uri(spec: ModelDeploymentSpec, owner: B.Owner, record: RoundRecord) -> str:
    """Where an accepted round's weights are in the artifact store (the file its record names)."""
    name = PurePosixPath(record.model.path).name if record.model is not None else ""
    name = name if name in _WEIGHTS_NAMES else WEIGHTS_FILE
    return f"{B.store_uri(spec).rstrip('/')}/{store_rel(owner)}/rounds/{record.round:04d}/{name}"


def adapter_uri(spec: ModelDeploymentSpec, owner: B.Owner, record: RoundRecord) -> str:
    """Where an accepted adapter round's peft directory is in the store: the next round starts from it."""
    return f"{B.store_uri(spec).rstrip('/')}/{store_rel(owner)}/rounds/{record.round:04d}/{ADAPTER_DIR}"


def read_records(observed: Observed) -> list[RoundRecord]:
    records = {}
    for cm in observed.of_kind("ConfigMap"):
        if cm.labels.get(L.COMPONENT) != L.COMPONENT_ROUND:
            continue
        text = (cm.body.get("data") or {}).get(RECORD_FILE)
        try:
            record = RoundRecord.model_validate_json(text or "")
        except ValidationError:
            continue  # a record we cannot read counts as no record: the round is retried
        records[record.round] = record
    return [records[k] for k in sorted(records)]


def site_nodes(spec: ModelDeploymentSpec, observed: Observed) -> dict[str, int]:
    """Edge nodes per site (value of `learning.siteLabel`)."""
    assert spec.learning is not None
    found: dict[str, int] = {}
    for node in observed.nodes:
        if all(node.labels.get(k) == v for k, v in spec.edge.node_selector.items()):
            site = node.labels.get(spec.learning.site_label)
            if site:
                found[site] = found.get(site, 0) + 1
    return found


def sites(spec: ModelDeploymentSpec, observed: Observed) -> list[str]:
    return sorted(site_nodes(spec, observed))


def _parse_time(text: str | None) -> datetime | None:
    # Not `api.scalars.parse_time`: a round record's times are the aggregator's (`isoformat`, "+00:00").
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _local(uri: str, mount: str, name: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """An in-pod path for a file:// or pvc:// URI, and the volume that makes it so."""
    source = B.model_source(uri)
    if source.claim is None:
        return source.uri.removeprefix("file://"), [], []
    path = source.uri.removeprefix(f"file://{B.MODEL_MOUNT}")
    volume = {"name": name, "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}}
    return f"{mount}{path}", [volume], [{"name": name, "mountPath": mount, "readOnly": True}]


def _checkpoint(spec: ModelDeploymentSpec) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """A language model's checkpoint in the round's pods (its path, and the volume a pvc:// source needs);
    nothing for a tensor model."""
    return (
        _local(spec.model.source.uri, BASE_MODEL_MOUNT, "base-model")
        if learns_adapter(spec)
        else ("", [], [])
    )


def _container(
    spec: ModelDeploymentSpec, name: str, args: list[str], mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    return F.container(spec, name, ["kiri"], mounts, args=args, flower_env=False)


def _job(name: str, labels: dict[str, str], pod: dict[str, Any], deadline: int) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": B._metadata(name, labels),
        "spec": {
            # A failed round is a skipped round; retrying a trainer would release a second noised update.
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline,
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {"restartPolicy": "Never", "securityContext": B.pod_security(), **pod},
            },
        },
    }


def run_config(
    spec: ModelDeploymentSpec,
    owner: B.Owner,
    n: int,
    sites: Sequence[str],
    weights: str,
    eval_path: str,
    layout: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The round's Flower run config (kiri_runtime.learning.settings reads it; launching.DEFAULTS lists it).
    A language model's adds the adapter's settings and the served variant's `layout` (its lora.json)."""
    learning = spec.learning
    assert learning is not None
    store = B.artifact_dir(spec, owner, "learning")
    part = learning.trained
    adapter: dict[str, Any] = {}
    if learns_adapter(spec):
        targets = part.layers or list((layout or {}).get("targets") or [])
        adapter = {
            "part": "adapter",
            "base-model": _checkpoint(spec)[0],
            "adapter-targets": ",".join(targets),
            "adapter-steps": part.steps,
            "adapter-seq-len": part.sequence_length,
            "ffa": True,
            # One A for every site and round (FFA-LoRA): drawn from the ModelDeployment's uid.
            "a-seed": int(L.short_hash(owner.uid, length=7), 16),
            "serve-layout": json.dumps(layout or {}, sort_keys=True, separators=(",", ":")),
        }
    return {
        "factory": learning.trainable.factory if learning.trainable is not None else "",
        "weights": weights,
        "eval": eval_path,
        "out": store.out_dir,
        "round": n,
        "sites": ",".join(sites),
        "min-clients": learning.min_clients,
        "deadline-seconds": float(learning.schedule.deadline_seconds),
        "part": part.kind,
        "layers": ",".join(part.layers),
        "lora-rank": part.rank,
        "epochs": learning.local_epochs,
        "learning-rate": learning.learning_rate,
        "batch-size": learning.batch_size,
        "clip-norm": learning.dp.clip_norm,
        "noise-multiplier": learning.dp.noise_multiplier,
        "dp-delta": learning.dp.delta or DEFAULT_DELTA,
        "target-epsilon": learning.dp.target_epsilon,
        "secure-aggregation": learning.secure_aggregation,
        "policy": learning.policy,
        "aggregation": learning.aggregation,
        "trim-fraction": learning.trim_fraction,
        # The privacy spend goes to the API before the round is aggregated, so a crash cannot lose it.
        "ledger": f"configmap:{owner.namespace}/{ledger_name(owner.name)}",
        "ledger-factory": LEDGER_FACTORY,
        "ledger-owner": f"{owner.name}:{owner.uid}",
        **adapter,
    }


def round_objects(
    spec: ModelDeploymentSpec,
    owner: B.Owner,
    n: int,
    site_names: Sequence[str],
    base_weights: str,
    attempt: int = 1,
    service_account: str = "kiri-compressor",
    layout: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The federation (SuperLink, a SuperNode per site) and round N's Job, which submits the round to the
    SuperLink (`kiri learn-round`) and publishes its record (`kiri publish-round`)."""
    learning = spec.learning
    assert learning is not None
    store = B.artifact_dir(spec, owner, "learning")
    out_dir = store.out_dir
    sched = learning.schedule
    deadline = sched.deadline_seconds + 600
    labels = {**L.common_labels(owner.name, L.COMPONENT_LEARNING), L.LEARNING_ROUND: str(n)}
    labels[L.LEARNING_ROLE] = F.ROLE_ROUND
    # Paths in the SuperLink's pod, where the ServerApp runs (federation_objects mounts them there).
    weights_path, _, _ = _local(base_weights, "/weights", "weights")
    eval_path, _, _ = _local(learning.eval_data_uri, "/eval", "eval")
    chosen = (
        list(site_names)[: learning.clients_per_round] if learning.clients_per_round else list(site_names)
    )
    config = run_config(spec, owner, n, chosen, weights_path, eval_path, layout)
    round_args = [
        "learn-round",
        "--superlink", F.control_address(owner),
        "--root-certificates", f"{F.TLS_MOUNT}/ca.crt",
        "--run-config-json", json.dumps(config, sort_keys=True),
        "--work-dir", "/tmp/kiri-round",
        "--timeout", str(sched.deadline_seconds + 300),
        # A skipped or refused round is an outcome, not a failure: `publish-round` must run to hand it over.
        "--any-record-succeeds",
    ]  # fmt: skip
    publish_args = [
        "publish-round",
        "--namespace", owner.namespace,
        "--name", record_name(owner.name, n),
        "--record", f"{out_dir}/rounds/{n:04d}/{RECORD_FILE}",
        "--round", str(n),
        "--owner-name", owner.name,
        "--owner-uid", owner.uid,
    ]  # fmt: skip
    store_mount: dict[str, Any] = {"name": "artifacts", "mountPath": store.mount_path}
    tls_mount: dict[str, Any] = {"name": "tls", "mountPath": F.TLS_MOUNT, "readOnly": True}
    tmp_mount: dict[str, Any] = {"name": "tmp", "mountPath": "/tmp"}
    job = _job(
        round_job_name(owner.name, n, attempt),
        labels,
        B.pod_identity(
            spec,
            service_account,
            {
                # Only `publish` talks to the API (the round record); the ServerApp, in the SuperLink's pod,
                # writes the ledger.
                "automountServiceAccountToken": False,
                "nodeSelector": dict(spec.cloud.node_selector),
                "tolerations": B.tolerations(spec.cloud.tolerations),
                "initContainers": [
                    _container(spec, "round", round_args, [store_mount, tls_mount, tmp_mount])
                ],
                "containers": [
                    _container(spec, "publish", publish_args, [store_mount, tmp_mount, B.api_token_mount()])
                ],
                "volumes": [
                    B.api_token_volume(),
                    store.volume,
                    {
                        "name": "tls",
                        "secret": {
                            "secretName": F.tls_secret_name(owner.name),
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        },
                    },
                    {"name": "tmp", "emptyDir": {}},
                ],
            },
        ),
        deadline,
    )
    federation = federation_objects(spec, owner, chosen, base_weights, service_account, registered=site_names)
    return [*federation, B.finish(job, owner)]


def federation_objects(
    spec: ModelDeploymentSpec,
    owner: B.Owner,
    sites: Sequence[str],
    base_weights: str,
    service_account: str,
    *,
    registered: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The SuperLink (Deployment, Service, NetworkPolicy), one SuperNode per site in `sites` and the
    SuperNodes' NetworkPolicy: wanted while rounds remain.
    The SuperLink lets in the SuperNodes of `registered` (all the spec's sites; `sites` by default): a round
    that picks fewer sites changes which SuperNodes run, not the SuperLink's pod (which would restart it)."""
    learning = spec.learning
    assert learning is not None
    _, w_vols, w_mounts = _local(base_weights, "/weights", "weights")
    _, e_vols, e_mounts = _local(learning.eval_data_uri, "/eval", "eval")
    # A language model's checkpoint: the ServerApp scores adapters with it (each site's SuperNode mounts it too).
    _, m_vols, m_mounts = _checkpoint(spec)
    link = F.superlink(spec, owner, service_account, sites if registered is None else registered)
    # The ServerApp runs in the SuperLink's pod: it reads the base weights and held-out set from there too.
    link[0] = _with_mounts(link[0], owner, [*w_vols, *e_vols, *m_vols], [*w_mounts, *e_mounts, *m_mounts])
    # Who may reach the SuperLink (its SuperNodes, its round Jobs); site_objects: who may reach a SuperNode.
    return [*link, F.superlink_network_policy(owner), *site_objects(spec, owner, sites)]


def site_objects(spec: ModelDeploymentSpec, owner: B.Owner, sites: Sequence[str]) -> list[dict[str, Any]]:
    """Each site's SuperNode (with its kept-adapter store and Service for a perSite language model), with a
    language model's checkpoint mounted."""
    _, m_vols, m_mounts = _checkpoint(spec)
    out: list[dict[str, Any]] = []
    for site in sites:
        objs = (
            F.keeping_supernode(spec, owner, site)
            if keeps_site_adapters(spec)
            else [F.supernode(spec, owner, site)]
        )
        if m_vols:
            objs[0] = _with_mounts(objs[0], owner, m_vols, m_mounts)
        out += objs
    return [*out, F.supernodes_network_policy(owner, serves_adapters=keeps_site_adapters(spec))]


def _with_mounts(
    deployment: dict[str, Any],
    owner: B.Owner,
    volumes: Sequence[dict[str, Any]],
    mounts: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    pod = deployment["spec"]["template"]["spec"]
    pod["volumes"] += [v for v in volumes if v not in pod["volumes"]]
    have = pod["containers"][0]["volumeMounts"]
    have += [m for m in mounts if m not in have]
    return B.finish(deployment, owner)  # the hash covers the mounts just added


def _round_status(record: RoundRecord) -> dict[str, Any]:
    after = record.eval_after or record.eval_before
    out: dict[str, Any] = {
        "round": record.round,
        "outcome": record.status.capitalize(),
        "reason": record.reason,
        "participants": [p.site for p in record.participants],
        "skipped": [{"site": s.site, "reason": s.reason} for s in record.skipped],
        "epsilon": round(record.privacy.epsilon, 6),
        "time": record.closed_at,
    }
    if after is not None:
        out["loss"] = round(after.loss, 6)
        if after.accuracy is not None:
            out["accuracy"] = round(after.accuracy, 6)
    gain = record.improvement()
    if gain is not None:
        out["improvement"] = round(gain, 6)
    if record.model is not None:
        out["modelSha256"] = record.model.sha256
    return out


def _metric(record: RoundRecord, after: bool) -> float | None:
    e = record.eval_after if after else record.eval_before
    if e is None:
        return None
    return e.accuracy if e.accuracy is not None else -e.loss


@dataclass
class LearningPlan:
    children: list[dict[str, Any]] = field(default_factory=list)
    keep: set[tuple[str, str]] = field(default_factory=set)
    status: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    condition: Condition | None = None
    secrets: list[SecretRequest] = field(default_factory=list)
    """The SuperLink's TLS Secret and each site's SuperNode key Secret, created once by the reconciler."""


def plan_learning(
    spec: ModelDeploymentSpec,
    observed: Observed,
    owner: B.Owner,
    *,
    variant_sizes: Mapping[str, int],
    settings: Settings | None = None,
    service_account: str = "kiri-compressor",
    layout: Mapping[str, Any] | None = None,
) -> LearningPlan:
    """Round Jobs to run, status.learning, and the update policy's verdict on the newest accepted round.

    `variant_sizes` are the accepted variants' sizes in the current manifest; a site is charged its edge nodes
    times the largest of them (an upper bound: which variant a node gets is decided later, by placement).
    A language model's `layout` is `lora_layout(manifest)`: its rounds wait for a LoRA-ready variant, and its
    newest accepted adapter is `status.learning.adapter`, which `effective_spec` hands to the adapter waves
    (planning/adapting.py: the update policy and the held-out gates apply there, per site).
    """
    learning = spec.learning
    if learning is None:
        return LearningPlan()
    lm = learns_adapter(spec)
    largest = max(variant_sizes.values(), default=0)
    bytes_per_site = {site: largest * count for site, count in site_nodes(spec, observed).items()}
    out = LearningPlan()
    now = observed.now
    old = dict(observed.status.get("learning") or {})
    records = read_records(observed)
    for r in records:
        out.keep.add(("ConfigMap", record_name(owner.name, r.round)))
    accepted = [r for r in records if r.status == "accepted" and r.model is not None]
    refused = any(r.status == "refused" for r in records)
    done = records[-1].round if records else 0
    out.keep.add(("ConfigMap", ledger_name(owner.name)))
    status: dict[str, Any] = {
        "roundsCompleted": len(records),
        "epsilonSpent": round(
            max(max((r.privacy.epsilon for r in records), default=0.0), ledger_epsilon(observed, owner.name)),
            6,
        ),
        "rounds": [_round_status(r) for r in records[-ROUNDS_KEPT:]],
    }

    # -- the next round ----------------------------------------------------------------------------
    n = done + 1
    host_fault = (settings or Settings()).host_path_refusal("learning.siteDataPath", learning.site_data_path)
    if host_fault is not None and n <= learning.rounds:
        out.condition = Condition(LEARNING_PROGRESSING, "False", Reason.HOST_PATH_NOT_ALLOWED, host_fault)
    elif n <= learning.rounds and not refused and lm and not layout:
        out.condition = Condition(
            LEARNING_PROGRESSING,
            "False",
            Reason.WAITING_FOR_LORA_READY_VARIANT if layout is None else Reason.NO_LORA_READY_VARIANT,
            "waiting for the compression manifest: each learned adapter is exported for a LoRA-ready variant"
            if layout is None
            else "no accepted variant is LoRA-ready: build one with edge.variants[].options.loraTargets "
            "(the learned adapter is exported for it)",
        )
    elif n <= learning.rounds and not refused:
        site_names = sites(spec, observed)
        if lm:
            base = adapter_uri(spec, owner, accepted[-1]) if accepted else ""
        else:
            assert learning.trainable is not None  # the API requires it unless the model is a language model
            base = weights_uri(spec, owner, accepted[-1]) if accepted else learning.trainable.weights_uri
        # The federation stands while rounds remain: SuperNodes stay connected between rounds.
        out.secrets = [F.tls_request(owner), *(F.node_key_request(owner, site) for site in site_names)]
        if site_names:
            out.children = federation_objects(spec, owner, site_names, base, service_account)
        last_closed = _parse_time(records[-1].closed_at) if records else None
        due = (
            now
            if last_closed is None
            else last_closed + timedelta(seconds=learning.schedule.interval_seconds)
        )
        retry = dict(old.get("retry") or {})
        if retry.get("round") != n:
            retry = {}
        attempt = int(retry.get("attempt") or 1)
        failed = job_failure(observed, round_job_name(owner.name, n, attempt))
        if failed is not None and retry.get("failedAt") is None:
            # A failed aggregation wrote no record: without this the round would wait for one forever.
            delay = retry_delay(owner.uid, n, attempt)
            retry = {"round": n, "attempt": attempt, "failedAt": format_time(now), "reason": failed[:500]}
            retry["retryAt"] = format_time(now + timedelta(seconds=round(delay)))
            out.events.append(
                Event(
                    "Warning",
                    Reason.AGGREGATION_FAILED,
                    f"round {n} attempt {attempt}: {failed}; retrying at {retry['retryAt']}"[:1000],
                )
            )
        retry_at = _parse_time(retry.get("retryAt"))
        if retry.get("failedAt") is not None and retry_at is not None and now >= retry_at:
            attempt += 1
            retry = {"round": n, "attempt": attempt, "lastFailure": retry.get("reason", "")}
            out.events.append(Event("Normal", Reason.LEARNING_ROUND, f"round {n}: attempt {attempt} started"))
        if retry.get("failedAt") is not None:
            msg = f"round {n} attempt {attempt} failed ({retry.get('reason')}); retrying at {retry.get('retryAt')}"
            out.condition = Condition(LEARNING_PROGRESSING, "False", Reason.AGGREGATION_FAILED, msg)
            out.requeue_after = max(1.0, (retry_at - now).total_seconds()) if retry_at is not None else 30.0
        elif due <= now:
            if site_names:
                out.children = round_objects(
                    spec, owner, n, site_names, base, attempt, service_account=service_account, layout=layout
                )
                if old.get("activeRound") != n:
                    out.events.append(
                        Event("Normal", Reason.LEARNING_ROUND, f"round {n} started: {', '.join(site_names)}")
                    )
                status["activeRound"] = n
            if attempt > 1:
                out.condition = Condition(
                    LEARNING_PROGRESSING,
                    "True",
                    Reason.AGGREGATION_RETRYING,
                    f"round {n} attempt {attempt} running after: {retry.get('lastFailure', '')}"[:1000],
                )
            out.requeue_after = 30.0
        else:
            status["nextRoundAt"] = format_time(due)
            out.requeue_after = max(1.0, (due - now).total_seconds())
        if retry:
            status["retry"] = retry

    if keeps_site_adapters(spec) and not out.children:
        # The rounds are over (or between rounds, waiting): each site's SuperNode still serves what it kept.
        site_names = sites(spec, observed)
        out.children = site_objects(spec, owner, site_names)
        out.secrets = [F.tls_request(owner), *(F.node_key_request(owner, site) for site in site_names)]

    # -- update policy on the newest accepted round -----------------------------------------------------
    adopted = dict(old.get("model") or {})
    downloads = [
        Download(d["site"], int(d["bytes"]), t)
        for d in old.get("downloads") or []
        if (t := _parse_time(d.get("time"))) is not None and now - t < timedelta(days=1)
    ]
    candidate = accepted[-1] if accepted else None
    if lm:
        # The adapter waves decide per site (minImprovement, interval, bytes per day, held-out gates).
        if keeps_site_adapters(spec):
            kept = kept_status(owner, records)
            if kept:
                status["siteAdapters"] = kept
        elif candidate is not None and candidate.served is not None:
            status["adapter"] = adapter_status(spec, owner, candidate, records)
        out.status = status
        out.condition = out.condition or _progressing(status, records, learning.rounds)
        return out
    if candidate is not None and candidate.round > int(adopted.get("round") or 0):
        current = next((r for r in accepted if r.round == adopted.get("round")), None)
        baseline = _metric(current, True) if current else _metric(records[0], False)
        new = _metric(candidate, True)
        gain = None if new is None or baseline is None else new - baseline
        last = _parse_time(adopted.get("adoptedAt"))
        verdict = decide(
            spec.rollout.update_policy,
            Candidate(
                f"round-{candidate.round}",
                bytes_per_site,
                learned=True,
                improvement=gain,
                round=candidate.round,
            ),
            now=now,
            last_rollout_at=last,
            downloads=downloads,
        )
        update: dict[str, Any] = {
            "allowed": verdict.allowed,
            "reason": verdict.reason,
            "round": candidate.round,
        }
        if verdict.retry_after_seconds is not None:
            update["retryAfterSeconds"] = verdict.retry_after_seconds
            wait = float(max(1, verdict.retry_after_seconds))
            out.requeue_after = min(out.requeue_after or wait, wait)
        old_update = old.get("update") or {}
        if verdict.allowed:
            assert candidate.model is not None
            adopted = {
                "round": candidate.round,
                "uri": weights_uri(spec, owner, candidate),
                "sha256": candidate.model.sha256,
                "adoptedAt": format_time(now),
            }
            downloads += [Download(site, b, now) for site, b in bytes_per_site.items() if b > 0]
            out.events.append(
                Event("Normal", Reason.LEARNED_MODEL_ADOPTED, f"round {candidate.round}: {verdict.reason}")
            )
            update["time"] = format_time(now)
        elif old_update.get("round") == candidate.round and old_update.get("reason") == verdict.reason:
            update = dict(
                old_update
            )  # the same verdict keeps its time and retry: steady state writes nothing
        else:
            update["time"] = format_time(now)
            out.events.append(
                Event("Normal", Reason.LEARNED_MODEL_DEFERRED, f"round {candidate.round}: {verdict.reason}")
            )
        status["update"] = update
    elif old.get("update"):
        status["update"] = old["update"]
    if adopted:
        status["model"] = adopted
    if downloads:
        status["downloads"] = [
            {"site": d.site, "bytes": d.bytes, "time": format_time(d.time)} for d in downloads
        ]
    out.status = status
    out.condition = out.condition or _progressing(status, records, learning.rounds)
    return out


def _progressing(status: Mapping[str, Any], records: Sequence[RoundRecord], total: int) -> Condition:
    """LearningProgressing when nothing is wrong: set every time, so a failure's False does not outlive it."""
    if records and records[-1].status == "refused":
        last = records[-1]
        return Condition(
            LEARNING_PROGRESSING,
            "True",
            Reason.LEARNING_COMPLETE,
            f"stopped at round {last.round}: {last.reason}",
        )
    if len(records) >= total:
        return Condition(LEARNING_PROGRESSING, "True", Reason.LEARNING_COMPLETE, f"all {total} rounds closed")
    if status.get("activeRound"):
        return Condition(
            LEARNING_PROGRESSING, "True", Reason.LEARNING_ROUND, f"round {status['activeRound']} running"
        )
    if status.get("nextRoundAt"):
        message = f"round {len(records) + 1} of {total} starts at {status['nextRoundAt']}"
        return Condition(LEARNING_PROGRESSING, "True", Reason.LEARNING_ROUND, message)
    return Condition(
        LEARNING_PROGRESSING,
        "True",
        Reason.LEARNING_ROUND,
        "no site to train on: no edge node has the site label",
    )


def effective_spec(
    spec: ModelDeploymentSpec, learning_status: Mapping[str, Any] | None, site_names: Sequence[str] = ()
) -> ModelDeploymentSpec:
    """The spec the edge is built from. A tensor model: `spec.model` with the adopted learned weights as its
    source. A language model: the same model and revision, `edge.adapters` plus the learned adapter."""
    if learns_adapter(spec):
        return with_learned_adapters(spec, learning_status, site_names)
    model = (learning_status or {}).get("model") or {}
    if spec.learning is None or not model.get("uri") or not model.get("sha256"):
        return spec
    source = ModelSource.model_construct(uri=model["uri"], format="factory", sha256=model["sha256"])  # type: ignore[arg-type]
    learned = spec.model.model_copy(
        update={"version": f"{spec.model.version}-fl{model['round']}", "source": source}
    )
    return spec.model_copy(update={"model": learned})


def record_json(record: RoundRecord) -> str:
    return json.dumps(record.model_dump(mode="json", by_alias=True), sort_keys=True)
