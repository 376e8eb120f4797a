"""The cloud tier: the full model's Deployment (`kiri serve`, or vLLM: `planning.vllm`) and Service, and why it
cannot run when it cannot.

A language model (source format hf or gguf) is not served from its source: `kiri serve` loads a packed
onnxruntime-genai model, so the cloud tier serves the full-precision pack the compression Job builds and
publishes beside the edge variants (the manifest's `model.uri`, checked against the source by the Job). Until
that is published the Deployment waits (CloudReady False, WaitingForCloudPack); when a new compression runs,
the Deployment of the last pack is kept serving until the new one is published. vLLM serves the hf source
itself and needs no pack.

Also the model source check (a `pvc://` claim that is not there), because the cloud tier is the first to
load the source and a missing claim holds every tier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.api.specs import LM_FORMATS, ModelDeploymentSpec
from kiri_operator.conditions import Condition, Reason
from kiri_operator.observations import ObjectView, Observed, PodView
from kiri_operator.planning import building as B
from kiri_operator.planning.placing import parse_quantity, selects
from kiri_operator.planning.settings import Settings
from kiri_operator.planning.vllm import vllm_deployment
from kiri_operator.plans import TierPlan

GPU = "nvidia.com/gpu"


# Each path through the planner sets the condition; this default is never stored.
_UNDECIDED = Condition(C.CLOUD_READY, "Unknown", "", "")


@dataclass
class CloudPlan(TierPlan):
    condition: Condition = _UNDECIDED
    ready_replicas: int = 0
    source_fault: str | None = None
    """Why the model source cannot be read (a missing claim); it holds compression too."""
    no_node: Condition | None = None
    """Set when no node matches the cloud nodeSelector: the compression Job cannot run either."""
    fault: Condition | None = None
    """Why the cloud tier cannot be scheduled at all (`cloud_fault`)."""


def serves_pack(spec: ModelDeploymentSpec) -> bool:
    """Whether the cloud tier serves the compression Job's onnxruntime-genai pack instead of the source."""
    return spec.model.source.format in LM_FORMATS and spec.cloud.runtime.engine == "kiri"


def cloud_faults(spec: ModelDeploymentSpec, observed: Observed) -> CloudPlan:
    """The cloud tier's faults alone (a missing claim, no cloud node): what compression needs from it."""
    out = CloudPlan(source_fault=source_fault(spec, observed))
    out.fault = cloud_fault(spec, observed)
    if out.fault is not None and out.fault.reason == Reason.NO_CLOUD_NODE:
        out.no_node = out.fault
    return out


def plan_cloud(
    spec: ModelDeploymentSpec,
    observed: Observed,
    owner: B.Owner,
    settings: Settings,
    pack: B.CloudPack | None = None,
    waiting: str = "",
    faults: CloudPlan | None = None,
) -> CloudPlan:
    """The cloud tier's children and CloudReady. `pack` is the published pack of a language model
    (`serves_pack`), `waiting` why there is none yet; `faults` is `cloud_faults` when already computed."""
    name = L.cloud_name(owner.name)
    out = faults if faults is not None else cloud_faults(spec, observed)
    fault = out.fault
    cloud_pods = [p for p in observed.pods if p.component == L.COMPONENT_CLOUD]
    if out.source_fault is not None or fault is not None:
        # A child we cannot build right now stays as it is: no half-made replacement, no deletion.
        out.keep |= {(kind, name) for kind in ("Deployment", "Service") if observed.child(kind, name)}
        if out.source_fault is not None:
            out.condition = Condition(C.CLOUD_READY, "False", Reason.MISSING_PVC, out.source_fault)
        elif fault is not None:
            out.condition = fault
    elif serves_pack(spec) and pack is None and spec.cloud.replicas > 0:
        # Nothing to serve yet. The Service is the same either way; a Deployment of an earlier pack (one
        # that an edit of the variants is recompressing) keeps serving until the new pack is published.
        out.children.append(B.cloud_service(spec, owner))
        served = observed.child("Deployment", name)
        if served is None:
            why = (
                waiting
                or "waiting for the compression Job to publish the full model's onnxruntime-genai pack"
            )
            out.condition = Condition(C.CLOUD_READY, "False", Reason.WAITING_FOR_CLOUD_PACK, why)
        else:
            out.keep.add(("Deployment", name))
            out.condition, out.ready_replicas = cloud_condition(spec, served, cloud_pods)
    else:
        if spec.cloud.runtime.engine == "vllm":
            deployment = vllm_deployment(spec, owner, settings.pod_labels)
        else:
            deployment = B.cloud_deployment(spec, owner, settings.pod_labels, pack)
        out.children += [deployment, B.cloud_service(spec, owner)]
        out.condition, out.ready_replicas = cloud_condition(
            spec, observed.child("Deployment", name), cloud_pods
        )
    out.conditions.append(out.condition)
    return out


def cloud_fault(spec: ModelDeploymentSpec, observed: Observed) -> Condition | None:
    """Why the cloud tier cannot be scheduled at all, if it cannot."""
    # One pass that stops at the first node that fits: this runs every reconcile, over the whole fleet.
    need = spec.cloud.resources.gpu if spec.cloud.replicas > 0 else 0
    matched, most = 0, 0.0
    for node in observed.nodes:
        if not selects(spec.cloud.node_selector, node):
            continue
        if need <= 0:
            return None
        gpus = parse_quantity(node.allocatable.get(GPU, "0")) or 0
        if gpus >= need:
            return None
        matched, most = matched + 1, max(most, gpus)
    if not matched:
        sel = ",".join(f"{k}={v}" for k, v in sorted(spec.cloud.node_selector.items()))
        return Condition(
            C.CLOUD_READY, "False", Reason.NO_CLOUD_NODE, f"no node matches the cloud nodeSelector {sel}"
        )
    return Condition(
        C.CLOUD_READY,
        "False",
        Reason.NO_GPU_NODE,
        f"no cloud node has {need} allocatable {GPU} (at most {most:g} among {matched} node(s))",
    )


def source_fault(spec: ModelDeploymentSpec, observed: Observed) -> str | None:
    for uri in (spec.model.source.uri, spec.edge.artifacts.uri or ""):
        parsed = urlparse(uri)
        if parsed.scheme != "pvc" or observed.pvcs is None:
            continue
        if parsed.netloc not in observed.pvcs:
            return f"PersistentVolumeClaim {parsed.netloc!r} (from {uri}) not found in namespace {observed.namespace}"
    return None


def _idle_gpu(spec: ModelDeploymentSpec) -> str:
    """A note for a language model that decodes on CPU while its pods hold GPUs (the default
    `cloud.resources.gpu` is 1): a GPU per replica that nothing uses."""
    if serves_pack(spec) and spec.cloud.runtime.device == "cpu" and spec.cloud.resources.gpu > 0:
        return (
            f"; each pod holds {spec.cloud.resources.gpu} {GPU} that it does not use: the language model decodes "
            "on CPU (cloud.runtime.device cpu); set device cuda, or cloud.resources.gpu 0"
        )
    return ""


def cloud_condition(
    spec: ModelDeploymentSpec, deployment: ObjectView | None, pods: Sequence[PodView] = ()
) -> tuple[Condition, int]:
    """CloudReady from the Deployment's status; while replicas are missing, the message ends with why its
    pods say they are not ready (`conditions.not_ready_note`)."""
    if spec.cloud.replicas == 0:
        return Condition(C.CLOUD_READY, "True", Reason.CLOUD_DISABLED, "spec.cloud.replicas is 0"), 0
    if deployment is None:
        return Condition(C.CLOUD_READY, "False", Reason.DEPLOYMENT_PROGRESSING, "creating the Deployment"), 0
    status = deployment.status
    ready = int(status.get("readyReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    fresh = int(status.get("observedGeneration") or 0) >= int(deployment.metadata.get("generation") or 0)
    want = spec.cloud.replicas
    if fresh and available >= want and updated >= want and ready >= want:
        return Condition(
            C.CLOUD_READY,
            "True",
            Reason.DEPLOYMENT_AVAILABLE,
            f"{ready}/{want} replicas ready{_idle_gpu(spec)}",
        ), ready
    for cond in status.get("conditions") or []:
        # The ReplicaSet's own condition, which the Deployment copies: admission refused its pods.
        refused = cond.get("type") == "ReplicaFailure" and cond.get("status") == "True"
        if refused and C.POD_SECURITY_MARK in str(cond.get("message") or ""):
            msg = f"{ready}/{want} replicas ready: pods refused: {cond.get('message', '')}"
            return Condition(C.CLOUD_READY, "False", Reason.POD_SECURITY_REFUSED, msg[:1000]), ready
    note = C.not_ready_note(p.reason for p in pods if not p.ready)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            msg = f"{ready}/{want} replicas ready: {cond.get('message', '')}{note}"
            return Condition(C.CLOUD_READY, "False", Reason.DEPLOYMENT_UNAVAILABLE, msg[:1000]), ready
    return Condition(
        C.CLOUD_READY, "False", Reason.DEPLOYMENT_PROGRESSING, f"{ready}/{want} replicas ready{note}"[:1000]
    ), ready
