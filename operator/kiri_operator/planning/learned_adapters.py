"""A language model's learned LoRA adapters, from the round records to `edge.adapters`. Pure.

Vocabulary: a language model *learns adapters* (`spec.learning` without `trainable`, `model.source.format: hf`):
its rounds train a LoRA adapter on the checkpoint itself (planning/learning.py makes the rounds). `federated`:
each accepted round writes one global adapter and the `.onnx_adapter` the edge loads, exported for the *layout*
(`lora.json`) of the first accepted LoRA-ready variant in the compression manifest; the newest is
`status.learning.adapter`. `perSite`: each site *keeps* its own adapter on the site (its SuperNode serves it to
the site's edge pods) and reports its digest and held-out perplexities only; each site's newest is in
`status.learning.siteAdapters`. `with_learned_adapters` adds them to `edge.adapters` under `learning.adapterName`,
so planning/adapting.py rolls them out per site, with the adapter waves' gates, like a declared adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kiri_operator.api.specs import AdapterSpec, HeldOutMetric, ModelDeploymentSpec
from kiri_operator.planning import building as B
from kiri_operator.planning import federation as F
from kiri_runtime.learning.rounds import RoundRecord
from kiri_runtime.manifests import LORA_LAYOUT_KEY, Manifest

SERVED_FILE = "adapter.onnx_adapter"
"""An accepted federated round's adapter as the edge loads it (kiri_runtime/learning/adapter_rounds.py, which
imports numpy: the operator spells it here)."""


def learns_adapter(spec: ModelDeploymentSpec) -> bool:
    """A language model's learning: sites train a LoRA adapter on the checkpoint (the API allows hf only)."""
    return spec.learning is not None and spec.learning.trainable is None


def lora_layout(manifest: Manifest | None) -> dict[str, Any] | None:
    """The LoRA layout (lora.json) of the first accepted LoRA-ready variant: what each learned adapter is
    exported for. None while there is no manifest; {} when no accepted variant is LoRA-ready."""
    if manifest is None:
        return None
    for variant in manifest.accepted():
        layout = variant.extra.get(LORA_LAYOUT_KEY)
        if isinstance(layout, dict):
            return layout
    return {}


def keeps_site_adapters(spec: ModelDeploymentSpec) -> bool:
    """A perSite language model: each site keeps its adapter, and its SuperNode serves it to the site."""
    return learns_adapter(spec) and spec.learning is not None and spec.learning.policy == "perSite"


def served_uri(spec: ModelDeploymentSpec, owner: B.Owner, record: RoundRecord) -> str:
    """Where the edge fetches an accepted round's `.onnx_adapter` (through `edge.artifacts.fetchUri` if set)."""
    return f"{B.artifact_dir(spec, owner, 'learning').fetch_base}rounds/{record.round:04d}/{SERVED_FILE}"


def _perplexity(loss: float) -> float:
    return round(math.exp(min(loss, 50.0)), 6)


def adapter_status(
    spec: ModelDeploymentSpec, owner: B.Owner, record: RoundRecord, records: Sequence[RoundRecord]
) -> dict[str, Any]:
    """The newest accepted round's adapter, as the edge fetches it, with its held-out perplexity: the base's
    (round 1 starts from B = 0, the base model's own output), the round's start (the previous adapter) and
    the new adapter, all on `learning.evalDataUri`."""
    assert record.served is not None and record.eval_after is not None
    first = records[0].eval_before
    held_out: dict[str, Any] = {"metric": "perplexity", "adapter": _perplexity(record.eval_after.loss)}
    if first is not None:
        held_out["base"] = _perplexity(first.loss)
    if record.round > 1 and record.eval_before is not None:
        held_out["current"] = _perplexity(record.eval_before.loss)
    return {
        "round": record.round,
        "uri": served_uri(spec, owner, record),
        "sha256": record.served.sha256,
        "sizeBytes": record.served.bytes,
        "heldOut": held_out,
    }


def kept_status(owner: B.Owner, records: Sequence[RoundRecord]) -> list[dict[str, Any]]:
    """perSite: each site's newest kept adapter (from the newest accepted round it reported one in), as its
    SuperNode serves it, with the perplexities it measured on its own held-out text."""
    newest: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.status != "accepted":
            continue
        for p in record.participants:
            kept = p.adapter
            if kept is None or not F.KEPT_FILE.match(kept.file):
                continue  # a file name that is not the ClientApp's own is not fetched
            newest[p.site] = {
                "site": p.site,
                "round": record.round,
                "uri": F.site_store_url(owner, p.site, kept.file),
                "sha256": kept.sha256,
                "sizeBytes": kept.bytes,
                "heldOut": {
                    "metric": "perplexity",
                    "base": round(kept.held_out_base_perplexity, 6),
                    "adapter": round(kept.held_out_adapter_perplexity, 6),
                },
            }
    return [newest[site] for site in sorted(newest)]


def _as_declared(spec: ModelDeploymentSpec, found: Mapping[str, Any], sites: Sequence[str]) -> AdapterSpec:
    """A learned adapter's status entry as `edge.adapters` would declare it for `sites`: their default unless
    `edge.adapters` names a default for one of them (then a request picks it by name)."""
    assert spec.learning is not None
    held = found.get("heldOut") or {}
    declared_default = any(a.default and set(a.sites) & set(sites) for a in spec.edge.adapters)
    return AdapterSpec.model_construct(
        name=spec.learning.adapter_name,
        uri=str(found["uri"]),
        sha256=str(found["sha256"]),
        size_bytes=int(found.get("sizeBytes") or 1),
        sites=list(sites),
        default=not declared_default,
        held_out=HeldOutMetric.model_validate(held) if "base" in held else None,
    )


def learned_adapter(
    spec: ModelDeploymentSpec, learning_status: Mapping[str, Any] | None, site_names: Sequence[str]
) -> AdapterSpec | None:
    """federated: the learned adapter for every learning site."""
    found = (learning_status or {}).get("adapter") or {}
    if spec.learning is None or not found.get("uri") or not site_names:
        return None
    return _as_declared(spec, found, site_names)


def site_adapters(
    spec: ModelDeploymentSpec, learning_status: Mapping[str, Any] | None, site_names: Sequence[str]
) -> list[AdapterSpec]:
    """perSite: each site's own kept adapter, for that site alone, under the one `adapterName` (a request
    names the same adapter at every site; each site answers with its own). A site that left the fleet is
    left out."""
    return [
        _as_declared(spec, found, [str(found["site"])])
        for found in (learning_status or {}).get("siteAdapters") or []
        if found.get("site") in site_names and found.get("uri")
    ]


def with_learned_adapters(
    spec: ModelDeploymentSpec, learning_status: Mapping[str, Any] | None, site_names: Sequence[str]
) -> ModelDeploymentSpec:
    """`spec` with the learned adapters in `edge.adapters` (the same model, compression and revision)."""
    if keeps_site_adapters(spec):
        extra = site_adapters(spec, learning_status, site_names)
    else:
        adapter = learned_adapter(spec, learning_status, site_names)
        extra = [] if adapter is None else [adapter]
    if not extra:
        return spec
    edge = spec.edge.model_copy(update={"adapters": [*spec.edge.adapters, *extra]})
    return spec.model_copy(update={"edge": edge})
