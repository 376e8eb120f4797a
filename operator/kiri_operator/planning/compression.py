"""The compression tier: one Job per compression key, whose manifest ConfigMap gates what reaches the edge.

Vocabulary: the *compression key* names what was compressed (model, variants, gates); the *manifest* is what
the Job published (one per key); a variant is *accepted* when the manifest says it passed its gates and gives
its artifact's URI and sha256.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.api.scalars import parse_time
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.conditions import Condition, Reason
from kiri_operator.observations import ManifestView, ObjectView, Observed
from kiri_operator.planning import building as B
from kiri_operator.planning.cloud import CloudPlan
from kiri_operator.planning.settings import Settings
from kiri_operator.plans import TierPlan
from kiri_runtime.manifests import Manifest, loads
from kiri_runtime.manifests import Variant as ManifestVariant

# Each path through the planner sets the condition; this default is never stored.
_UNDECIDED = Condition(C.VARIANTS_VERIFIED, "Unknown", "", "")


@dataclass
class CompressionPlan(TierPlan):
    key: str = ""
    condition: Condition = _UNDECIDED
    manifest: Manifest | None = None
    accepted: frozenset[str] = frozenset()
    variants: list[dict[str, Any]] = field(default_factory=list)
    """status.variants"""

    @property
    def unknown(self) -> bool:
        """Still compressing: neither verified nor failed."""
        return self.condition.status == "Unknown"


def plan_compression(
    spec: ModelDeploymentSpec,
    observed: Observed,
    owner: B.Owner,
    key: str,
    cloud: CloudPlan,
    settings: Settings,
) -> CompressionPlan:
    job_name = L.compress_name(owner.name, key)
    store = spec.edge.artifacts
    host_fault = settings.file_uri_refusal(
        [("edge.artifacts.uri", store.uri), ("edge.artifacts.fetchUri", store.fetch_uri)]
    )
    if host_fault is not None and spec.edge.variants:
        out = CompressionPlan(
            key=key,
            condition=Condition(C.VARIANTS_VERIFIED, "False", Reason.HOST_PATH_NOT_ALLOWED, host_fault),
        )
        if observed.child("Job", job_name) is not None:
            out.keep.add(("Job", job_name))
        out.conditions.append(out.condition)
        return out
    if cloud.source_fault is not None and spec.edge.variants:
        out = CompressionPlan(
            key=key, condition=Condition(C.VARIANTS_VERIFIED, "False", Reason.MISSING_PVC, cloud.source_fault)
        )
        if observed.child("Job", job_name) is not None:
            out.keep.add(("Job", job_name))
    else:
        out = _read_compression(spec, observed, owner, key, settings)
        if cloud.no_node is not None and out.manifest is None and spec.edge.variants and out.unknown:
            # The Job runs on a cloud node: with none, it would wait forever.
            out.condition = Condition(
                C.VARIANTS_VERIFIED, "False", Reason.NO_CLOUD_NODE, cloud.no_node.message
            )
    if spec.edge.variants and cloud.source_fault is None:
        if out.manifest is None and out.unknown:
            account = B.job_service_account(
                owner, settings.compressor_service_account, settings.create_compressor_rbac
            )
            out.children.append(
                B.compression_job(
                    spec, owner, key, settings.pod_labels, settings.compression_deadline_seconds, account
                )
            )
        elif observed.child("Job", job_name) is not None:
            out.keep.add(("Job", job_name))
    out.conditions.append(out.condition)
    return out


def cloud_pack(
    spec: ModelDeploymentSpec, comp: CompressionPlan, owner: B.Owner
) -> tuple[B.CloudPack | None, str]:
    """What the compression Job published for a language model's cloud tier: the full model's onnxruntime-genai
    pack (the manifest's `model.uri` and sha256), or None and why there is none (CloudReady's message)."""
    if not spec.edge.variants:
        return None, (
            "a language model's cloud tier (engine kiri) serves the full model's onnxruntime-genai pack, which the "
            "compression Job builds with the edge variants; with no edge.variants none is built: add a variant "
            "(and model.evalDataUri), or use cloud.runtime.engine vllm on GPU nodes"
        )
    manifest = comp.manifest
    if manifest is None:
        if comp.unknown:
            return None, f"waiting for the full model's onnxruntime-genai pack: {comp.condition.message}"
        return None, f"no onnxruntime-genai pack of the full model: {comp.condition.message}"[:1000]
    if manifest.model.kind != "causal-lm" or not manifest.model.uri:
        name = L.manifest_name(owner.name, comp.key)
        return (
            None,
            f"manifest {name} has no onnxruntime-genai pack of the full model (model.kind is not causal-lm)",
        )
    base = B.artifact_dir(spec, owner, comp.key).fetch_base
    if B.serves_gpu_pack(spec):
        gpu = manifest.model.gpu_pack
        if gpu is None:
            name = L.manifest_name(owner.name, comp.key)
            return None, f"manifest {name} has no fp16 GPU pack of the full model (model.gpuPack)"
        return B.CloudPack(uri=B.resolve_uri(base, gpu.uri), sha256=gpu.sha256, device="cuda"), ""
    return B.CloudPack(uri=B.resolve_uri(base, manifest.model.uri), sha256=manifest.model.onnx_sha256), ""


def manifests_to_keep(observed: Observed, keys: set[str], limit: int) -> set[tuple[str, str]]:
    """The manifests of `keys` (the update revision's and every DaemonSet's) and the newest `limit`."""
    cms = [c for c in observed.of_kind("ConfigMap") if c.labels.get(L.COMPONENT) == L.COMPONENT_MANIFEST]
    newest = sorted(cms, key=lambda c: c.created, reverse=True)[:limit]
    return {("ConfigMap", c.name) for c in cms if c.labels.get(L.COMPRESSION) in keys} | {
        ("ConfigMap", c.name) for c in newest
    }


def read_manifest(cm: ObjectView) -> ManifestView:
    key = cm.labels.get(L.COMPRESSION, "")
    data = cm.body.get("data") or {}
    text = data.get(L.MANIFEST_KEY)
    if not isinstance(text, str):
        return ManifestView(key, error=f"ConfigMap {cm.name} has no {L.MANIFEST_KEY}")
    try:
        return ManifestView(key, manifest=loads(text))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError, as is bad JSON.
        return ManifestView(key, error=f"ConfigMap {cm.name}: {str(exc)[:500]}")


def _job_outcome(job: ObjectView) -> tuple[str, str, str | None]:
    """('failed'|'complete'|'running', message, completion time)."""
    for cond in job.status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Failed":
            reason = cond.get("reason") or "Failed"
            return "failed", f"{reason}: {cond.get('message') or 'the Job failed'}", None
        if cond.get("type") == "Complete":
            return "complete", "", job.status.get("completionTime") or cond.get("lastTransitionTime")
    return "running", "", None


def _seconds_since(stamp: str | None, now: datetime) -> float:
    if not stamp:
        return 0.0
    try:
        return (now - parse_time(stamp)).total_seconds()
    except ValueError:
        return 0.0


def _generative_fidelity(got: ManifestVariant) -> dict[str, Any]:
    """A language model's gate statistics in the `{metric: {stat: value}}` shape of status.variants[].fidelity."""
    g = got.generative
    assert g is not None
    fid: dict[str, Any] = {
        "kl": {"mean": g.kl_mean},
        "top1Agreement": g.top1_agreement,
        "perplexity": {"ratio": g.perplexity_ratio},
        "positions": g.positions,
    }
    if g.greedy_match is not None:
        fid["greedyMatch"] = {"mean": g.greedy_match, "tokens": g.greedy_tokens}
    return fid


def _variant_status(spec: ModelDeploymentSpec, manifest: Manifest, fetch_base: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for wanted in spec.edge.variants:
        got = manifest.variant(wanted.name)
        if got is None:
            out.append({"name": wanted.name, "state": "Rejected", "reason": "missing from the manifest"})
            continue
        entry: dict[str, Any] = {
            "name": got.name,
            "state": "Verified" if got.accepted and got.uri and got.sha256 else "Rejected",
            "reason": got.reason,
        }
        if got.fidelity is not None:
            fid: dict[str, Any] = {
                "cosine": got.fidelity.cosine.model_dump(by_alias=True),
                "maxAbsError": got.fidelity.max_abs_error,
                "samples": got.fidelity.samples,
            }
            if got.fidelity.top1_agreement is not None:
                fid["top1Agreement"] = got.fidelity.top1_agreement
            entry["fidelity"] = fid
        if got.generative is not None:
            entry["fidelity"] = _generative_fidelity(got)
        if got.latency is not None:
            entry["latency"] = {"p50Ms": got.latency.p50_ms, "ratioVsFp32": got.latency.ratio_vs_fp32}
        if got.decode is not None:
            entry.setdefault("latency", {}).update(
                {"decodeTokensPerS": got.decode.decode_tokens_per_s, "ttftMs": got.decode.ttft_ms}
            )
        if got.size_bytes is not None:
            entry["sizeBytes"] = got.size_bytes
        if got.sha256:
            entry["sha256"] = got.sha256
        if got.uri and entry["state"] == "Verified":
            entry["uri"] = B.resolve_uri(fetch_base, got.uri)
        out.append(entry)
    return out


def _read_compression(
    spec: ModelDeploymentSpec,
    observed: Observed,
    owner: B.Owner,
    key: str,
    settings: Settings,
) -> CompressionPlan:
    if not spec.edge.variants:
        return CompressionPlan(
            key=key, condition=Condition(C.VARIANTS_VERIFIED, "True", Reason.NO_VARIANTS, "no edge variants")
        )
    cm = observed.child("ConfigMap", L.manifest_name(owner.name, key))
    fetch_base = B.artifact_dir(spec, owner, key).fetch_base
    if cm is not None:
        view = read_manifest(cm)
        if view.manifest is None:
            cond = Condition(C.VARIANTS_VERIFIED, "False", Reason.MANIFEST_INVALID, view.error or "")
            return CompressionPlan(key=key, condition=cond)
        manifest = view.manifest
        if manifest.model.source_sha256.lower() != spec.model.source.sha256.lower():
            msg = f"manifest {cm.name} was built from sha256 {manifest.model.source_sha256}, not the spec's model"
            return CompressionPlan(
                key=key, condition=Condition(C.VARIANTS_VERIFIED, "False", Reason.MANIFEST_INVALID, msg)
            )
        variants = _variant_status(spec, manifest, fetch_base)
        accepted = frozenset(v["name"] for v in variants if v["state"] == "Verified")
        rejected = [f"{v['name']} ({v.get('reason', '')})" for v in variants if v["state"] != "Verified"]
        if not accepted:
            cond = Condition(
                C.VARIANTS_VERIFIED, "False", Reason.ALL_REJECTED, "rejected: " + "; ".join(rejected)
            )
        elif rejected:
            msg = f"accepted: {', '.join(sorted(accepted))}; rejected: {'; '.join(rejected)}"
            cond = Condition(C.VARIANTS_VERIFIED, "True", Reason.PARTIALLY_REJECTED, msg)
        else:
            cond = Condition(
                C.VARIANTS_VERIFIED, "True", Reason.VERIFIED, f"accepted: {', '.join(sorted(accepted))}"
            )
        return CompressionPlan(
            key=key, condition=cond, manifest=manifest, accepted=accepted, variants=variants
        )

    pending = [{"name": v.name, "state": "Compressing"} for v in spec.edge.variants]
    job = observed.child("Job", L.compress_name(owner.name, key))
    if job is not None:
        outcome, message, completed = _job_outcome(job)
        if outcome == "failed":
            failed = [
                {"name": v.name, "state": "Failed", "reason": message[:256]} for v in spec.edge.variants
            ]
            msg = f"compression Job {job.name} failed: {message}"
            cond = Condition(C.VARIANTS_VERIFIED, "False", Reason.COMPRESSION_FAILED, msg)
            return CompressionPlan(key=key, condition=cond, variants=failed)
        refusal = observed.refusal("Job", job.name)
        if outcome == "running" and refusal is not None:
            # Not final: the Job controller keeps trying, and a relabelled namespace lets the next try in.
            msg = f"compression Job {job.name} cannot start: {refusal}"[:1000]
            cond = Condition(C.VARIANTS_VERIFIED, "False", Reason.POD_SECURITY_REFUSED, msg)
            return CompressionPlan(key=key, condition=cond, variants=pending)
        if outcome == "complete":
            # completionTime is the Job controller's, so it is compared with the API server's time: against
            # an operator clock minutes ahead, a Job that had just completed failed for want of a manifest.
            waited = _seconds_since(completed, observed.server_time)
            if waited >= settings.manifest_grace_seconds:
                msg = f"compression Job {job.name} completed but published no manifest ConfigMap"
                failed = [
                    {"name": v.name, "state": "Failed", "reason": "no manifest"} for v in spec.edge.variants
                ]
                cond = Condition(C.VARIANTS_VERIFIED, "False", Reason.COMPRESSION_FAILED, msg)
                return CompressionPlan(key=key, condition=cond, variants=failed)
            cond = Condition(C.VARIANTS_VERIFIED, "Unknown", Reason.COMPRESSING, "waiting for the manifest")
            return CompressionPlan(
                key=key,
                condition=cond,
                variants=pending,
                requeue_after=settings.manifest_grace_seconds - waited,
            )
    msg = f"compression Job {L.compress_name(owner.name, key)} is building and verifying the variants"
    cond = Condition(C.VARIANTS_VERIFIED, "Unknown", Reason.COMPRESSING, msg)
    return CompressionPlan(key=key, condition=cond, variants=pending)
