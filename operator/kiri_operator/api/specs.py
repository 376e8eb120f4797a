"""`ModelDeployment.spec`: what the user asks for.

These models are the single source of the CRD schema (see `generating`). Every constraint is written
once here: ranges and enums become OpenAPI, cross-field rules are CEL in `x-kubernetes-validations` and
are mirrored by a pydantic validator so unit tests and the operator see the same verdict as the API
server. List sizes are bounded (`max_length`) because the API server rejects CEL rules whose worst-case
cost is unbounded.

Why one module: it is the spec's schema, read top to bottom as the CRD is (model, cloud, edge, rollout,
learning, then the root with its cross-field rules); the tiers' models refer to shared pieces and to each
other's limits, and the root's CEL rules name fields of every tier.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from kiri_operator.api.access import (
    MAX_PULL_SECRETS,
    LocalObjectReference,
    ServiceAccountName,
    StoreCredentials,
)
from kiri_operator.api.bases import ApiModel, cel, cel_rules
from kiri_operator.api.engines import (
    CUDA_NEEDS_GPU,
    CUDA_NEEDS_KIRI_LM,
    VLLM_NEEDS_GPU,
    VLLM_NEEDS_HF,
    VLLM_NO_KIRI_SETTINGS,
    VLLM_ONLY_WITH_ENGINE,
    CloudDevice,
    CloudEngine,
    VllmSpec,
)
from kiri_operator.api.presets import PRESET_FLOORS, AnalysisPreset, preset_promql
from kiri_operator.api.scalars import DnsLabel, IntOrPercent, LabelKey, Quantity, Sha256, Uri

DEFAULT_RUNTIME_IMAGE = "ghcr.io/kiri-dev/kiri-runtime:0.1.0"
DEFAULT_COMPRESSOR_IMAGE = "ghcr.io/kiri-dev/kiri-compressor:0.1.0"
DEFAULT_RUNTIME_CUDA_IMAGE = "ghcr.io/kiri-dev/kiri-runtime-cuda:0.1.0"
TIER_LABEL = "kiri.dev/tier"
DEFAULT_CACHE_PATH = "/var/lib/kiri/cache"
DEFAULT_ARTIFACTS_URI = "file:///var/lib/kiri/artifacts"

MAX_VARIANTS = 8
MAX_GATES = 8
MAX_STAGES = 20
MAX_QUERIES = 10
MAX_TENSORS = 64
MAX_SELECTOR_TERMS = 16

ModelFormat = Literal["onnx", "torch-export", "torchscript", "hf", "gguf"]
VariantMethod = Literal["int8-dynamic", "int8-static", "fp16", "distilled", "int4", "int8"]
GateMetric = Literal["cosine", "top1-agreement", "max-abs-error", "kl", "perplexity", "greedy-match"]
GateStat = Literal["mean", "min", "p5", "ratio"]
# Causal language models (docs/manifest.md "Language models"): their formats, methods and gate metrics.
LM_FORMATS = ("hf", "gguf")
LM_METHODS = ("int4", "int8")
TENSOR_METHODS = ("int8-dynamic", "int8-static", "distilled")
LM_METRICS = ("kl", "perplexity", "greedy-match")
TENSOR_METRICS = ("cosine", "max-abs-error")
GateOp = Literal[">=", ">", "<=", "<"]
OfflinePolicy = Literal["Skip", "Wait", "Fail"]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]
SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
# Open Inference Protocol v2 tensor datatypes.
TensorDatatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "BF16",
    "FP32",
    "FP64",
    "BYTES",
]
Version = Annotated[
    str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
]
LabelValue = Annotated[str, Field(max_length=63)]
Name = Annotated[
    str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
]


def _names_unique(items: list[Any], where: str) -> None:
    names = [item.name for item in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where} must be unique (duplicated: {', '.join(duplicates)})")


# --- model -------------------------------------------------------------------------------------------


class TensorSpec(ApiModel):
    """One input or output tensor of the model."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    """Tensor name as the model declares it."""
    datatype: TensorDatatype
    """Open Inference Protocol v2 datatype."""
    shape: Annotated[list[Annotated[int, Field(ge=-1)]], Field(max_length=16)] = []
    """Dimensions; -1 marks a dynamic one (usually the batch)."""


class ModelSignature(ApiModel):
    """Tensor names, datatypes and shapes. Needed to export torch models and to check ONNX ones."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self.inputs.all(t, self.inputs.exists_one(u, u.name == t.name))",
                "signature.inputs[].name must be unique",
                field_path=".inputs",
            ),
            cel(
                "self.outputs.all(t, self.outputs.exists_one(u, u.name == t.name))",
                "signature.outputs[].name must be unique",
                field_path=".outputs",
            ),
        )
    )

    inputs: Annotated[list[TensorSpec], Field(min_length=1, max_length=MAX_TENSORS)]
    """Model inputs, in the order the model takes them."""
    outputs: Annotated[list[TensorSpec], Field(min_length=1, max_length=MAX_TENSORS)]
    """Model outputs; the first is the one fidelity gates compare."""

    @model_validator(mode="after")
    def _unique(self) -> ModelSignature:
        _names_unique(self.inputs, "signature.inputs[].name")
        _names_unique(self.outputs, "signature.outputs[].name")
        return self


class ModelSource(ApiModel):
    """Where the full model comes from, and the digest that proves it arrived intact."""

    uri: Uri
    """`file://`, `http(s)://`, `s3://bucket/key` or `pvc://claim/path`."""
    format: ModelFormat = "onnx"
    """`onnx`, `torch-export` (a `torch.export` program), `torchscript`, or a causal language model: `hf` (a
    tar of a Hugging Face checkpoint directory) or `gguf` (a GGUF file)."""
    sha256: Sha256
    """Hex sha256 of the file at `uri`. Fetchers refuse any file that does not match."""
    credentials: StoreCredentials | None = None
    """How the pods that fetch the model (the cloud Deployment and the compression Job) authenticate to
    its store; also used for `model.evalDataUri`."""


class ModelSpec(ApiModel):
    """The full model that the cloud serves and the variants are built from."""

    name: DnsLabel
    """Model name served by the runtime (`/v2/models/{name}`) and used in child object names."""
    version: Version
    """User-visible version; recorded in the revision history."""
    source: ModelSource
    signature: ModelSignature | None = None
    """Optional for ONNX (read from the graph); torch formats use it to export."""
    eval_data_uri: Uri | None = None
    """An `.npz` with one array per model input (batch first), used to calibrate int8-static and to measure
    fidelity. Without it the compressor draws inputs from the signature. Language models (`hf`, `gguf`): JSON
    Lines of `{"text": ...}` or `{"messages": [...]}`, required when there are variants."""


# --- runtime -----------------------------------------------------------------------------------------


class RuntimeSpec(ApiModel):
    """Images for the model server and the compression Job."""

    image: Annotated[str, Field(min_length=1, max_length=512)] = DEFAULT_RUNTIME_IMAGE
    """Model server image run on cloud and edge nodes."""
    image_pull_policy: PullPolicy = "IfNotPresent"
    """Pull policy of both images."""
    compressor_image: Annotated[str, Field(min_length=1, max_length=512)] = DEFAULT_COMPRESSOR_IMAGE
    """Image of the `kiri compress` Job."""
    cuda_image: Annotated[str, Field(min_length=1, max_length=512)] = DEFAULT_RUNTIME_CUDA_IMAGE
    """Model server image of a language model's cloud pods on GPU nodes (engine `kiri`, `cloud.resources.gpu`
    ≥ 1): `kiri serve` with onnxruntime-genai's CUDA build, serving the full model's fp16 GPU pack."""
    image_pull_secrets: Annotated[list[LocalObjectReference], Field(max_length=MAX_PULL_SECRETS)] = []
    """Secrets (type `kubernetes.io/dockerconfigjson`, same namespace) every pod Kiri makes pulls its
    images with: a private registry."""
    compressor_service_account_name: ServiceAccountName | None = None
    """Service account of the compression Job, e.g. one bound to a cloud role that may read the model's
    bucket. It must also be allowed to create, get and patch ConfigMaps in the namespace (the Job publishes
    its manifest as one). Unset: the account Kiri manages for the Job."""


# --- cloud -------------------------------------------------------------------------------------------


CONTROL_PLANE_TAINTS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
_CEL_CONTROL_PLANE_TAINTS = "[" + ", ".join(f"'{t}'" for t in CONTROL_PLANE_TAINTS) + "]"
TOLERATION_KEY_REQUIRED = (
    "tolerations[].key is required: a toleration with no key tolerates every taint, control-plane nodes' "
    "included"
)
TOLERATION_CONTROL_PLANE = (
    "tolerations[].key must not be a control-plane taint (node-role.kubernetes.io/control-plane or "
    "node-role.kubernetes.io/master): Kiri's pods never run on control-plane nodes"
)


class Toleration(ApiModel):
    """A pod toleration (the core/v1 Toleration shape)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "tolerations[].value must be empty when tolerations[].operator is Exists",
                field_path=".value",
            ),
            cel(
                "has(self.key)",
                TOLERATION_KEY_REQUIRED,
                field_path=".key",
            ),
            cel(
                "!has(self.key) || !(self.key in " + _CEL_CONTROL_PLANE_TAINTS + ")",
                TOLERATION_CONTROL_PLANE,
                field_path=".key",
            ),
        )
    )

    key: LabelKey | None = None
    """Taint key; required. (Kubernetes reads `operator: Exists` with no key as "every taint", which would
    put a tenant's pods on control-plane nodes; Kiri refuses it, and refuses the control-plane taints.)"""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches `value`; `Exists` matches any value."""
    value: Annotated[str, Field(max_length=63)] | None = None
    """Taint value, for `operator: Equal`."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; empty tolerates all effects."""
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None
    """For `NoExecute`: how long the pod stays bound after the taint appears."""

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("tolerations[].value must be empty when tolerations[].operator is Exists")
        if self.key is None:
            raise ValueError(TOLERATION_KEY_REQUIRED)
        if self.key in CONTROL_PLANE_TAINTS:
            raise ValueError(TOLERATION_CONTROL_PLANE)
        return self


class ResourcesSpec(ApiModel):
    """Requests (and limits, equal to them) of each cloud replica."""

    cpu: Quantity = "1"
    """CPU, e.g. `500m` or `2`."""
    memory: Quantity = "2Gi"
    """Memory, e.g. `4Gi`."""
    gpu: Annotated[int, Field(ge=0, le=16)] = 1
    """`nvidia.com/gpu` count; 0 serves on CPU."""


class BatchingSpec(ApiModel):
    """Server-side dynamic batching."""

    enabled: bool = False
    """Group concurrent requests into one ONNX Runtime call."""
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 8
    """Largest batch the server forms."""
    max_wait_ms: Annotated[int, Field(ge=0, le=60000)] = 5
    """How long the first request of a batch waits for company."""


class ServingRuntimeSpec(ApiModel):
    """Model server settings."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel("!has(self.vllm) || self.engine == 'vllm'", VLLM_ONLY_WITH_ENGINE, field_path=".vllm"),
            cel(
                "self.engine != 'vllm' || !has(self.threads)"
                " && (!has(self.batching) || !has(self.batching.enabled) || !self.batching.enabled)",
                VLLM_NO_KIRI_SETTINGS,
                field_path=".engine",
            ),
        )
    )

    engine: CloudEngine = "kiri"
    """`kiri` (`kiri serve`: ONNX Runtime / onnxruntime-genai, CPU or GPU) or `vllm` (opt-in, language models
    from an `hf` source on GPU clouds: vLLM's OpenAI server; the edge verifies and continues against it the
    same way). docs/operations.md "A vLLM cloud tier"."""
    device: CloudDevice = "cpu"
    """Where `kiri serve` decodes a language model: `cpu` (the full model's fp32 pack) or `cuda` (needs
    `cloud.resources.gpu` ≥ 1: the compression Job also builds the full model's fp16 CUDA pack, served with
    onnxruntime-genai's CUDA build from `runtime.cudaImage`). `kiri` and language models only."""
    threads: Annotated[int, Field(ge=1, le=256)] | None = None
    """ONNX Runtime intra-op threads; unset lets the runtime match the CPU limit. `kiri` only."""
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    """Server-side dynamic batching. `kiri` only."""
    vllm: VllmSpec | None = None
    """Settings of engine `vllm` (its defaults when unset)."""

    @model_validator(mode="after")
    def _settings_fit_engine(self) -> ServingRuntimeSpec:
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError(VLLM_ONLY_WITH_ENGINE)
        if self.engine == "vllm" and (self.threads is not None or self.batching.enabled):
            raise ValueError(VLLM_NO_KIRI_SETTINGS)
        return self


def _cloud_tolerations() -> list[Toleration]:
    return [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]


class CloudSpec(ApiModel):
    """The full model, served by a Deployment and a Service on cloud GPU nodes."""

    replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    """Deployment replicas; 0 turns the cloud endpoint (and edge fallback) off."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    """Service and container port of the inference endpoint."""
    node_selector: Annotated[dict[str, LabelValue], Field(max_length=32)] = {TIER_LABEL: "cloud"}
    """Which nodes run the cloud replicas."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=_cloud_tolerations)
    """Tolerations of the cloud pods; the default tolerates the `nvidia.com/gpu` taint of GPU nodes."""
    runtime: ServingRuntimeSpec = Field(default_factory=ServingRuntimeSpec)
    service_account_name: ServiceAccountName | None = None
    """Service account of the cloud pods (e.g. one annotated for workload identity, to read the model's
    bucket). Its token is not mounted into the serving container. Unset: the namespace's `default`."""


# --- edge --------------------------------------------------------------------------------------------


class SelectorRequirement(ApiModel):
    """A node label requirement (the core/v1 NodeSelectorRequirement shape)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "!(self.operator in ['In', 'NotIn']) || size(self.values) > 0",
                "matchExpressions[].values must be non-empty when operator is In or NotIn",
                field_path=".values",
            ),
            cel(
                "!(self.operator in ['Exists', 'DoesNotExist']) || size(self.values) == 0",
                "matchExpressions[].values must be empty when operator is Exists or DoesNotExist",
                field_path=".values",
            ),
            cel(
                "!(self.operator in ['Gt', 'Lt']) || (size(self.values) == 1 && self.values[0].matches('^-?[0-9]+$'))",
                "matchExpressions[].values must be a single integer when operator is Gt or Lt",
                field_path=".values",
            ),
        )
    )

    key: LabelKey
    """Node label key."""
    operator: SelectorOperator
    """`In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt` or `Lt`."""
    values: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=64)] = []
    """Label values: several for `In`/`NotIn`, none for `Exists`/`DoesNotExist`, one integer for `Gt`/`Lt`."""

    @model_validator(mode="after")
    def _values_fit_operator(self) -> SelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError("matchExpressions[].values must be non-empty when operator is In or NotIn")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(
                "matchExpressions[].values must be empty when operator is Exists or DoesNotExist"
            )
        if self.operator in ("Gt", "Lt") and (
            len(self.values) != 1 or not self.values[0].lstrip("-").isdigit()
        ):
            raise ValueError("matchExpressions[].values must be a single integer when operator is Gt or Lt")
        return self


class NodeRequirements(ApiModel):
    """Which edge nodes can run a variant. Empty matches every edge node."""

    match_labels: Annotated[dict[str, LabelValue], Field(max_length=32)] = {}
    """Node labels that must all be present with these values (e.g. `kiri.dev/accelerator: gpu`)."""
    match_expressions: Annotated[list[SelectorRequirement], Field(max_length=MAX_SELECTOR_TERMS)] = []
    """Node label requirements, all of which must hold; `Gt`/`Lt` compare integer labels such as
    `kiri.dev/memory-mb`."""
    min_memory_mb: Annotated[int, Field(ge=1)] | None = None
    """Minimum allocatable node memory, in MiB."""


class VariantOptions(ApiModel):
    """Method options. Unknown keys are kept and passed to the compressor unchanged, so a new compressor
    option does not need a new CRD."""

    model_config = ConfigDict(extra="allow")

    per_channel: bool | None = None
    """int8: one scale per output channel instead of per tensor."""
    reduce_range: bool | None = None
    """int8: 7-bit weights, for CPUs without VNNI."""
    calibration_samples: Annotated[int, Field(ge=1, le=100000)] | None = None
    """int8-static: samples from `spec.model.evalDataUri` used to calibrate activations."""
    student_width: Annotated[int, Field(ge=1, le=65536)] | None = None
    """distilled: hidden width of the student. From an ONNX source the student is an MLP on the flattened
    input (one float input) with one linear head per output, of `studentDepth` ReLU layers of this width
    (default 64); from a PyTorch source it is a narrowed copy of the model."""
    student_depth: Annotated[int, Field(ge=1, le=256)] | None = None
    """distilled: number of hidden layers of the student (default 2 for the MLP student of an ONNX source)."""
    quantize: bool | None = None
    """distilled: also quantize the student to int8 (dynamic)."""
    keep_io_types: bool | None = None
    """fp16: keep fp32 inputs and outputs so clients need not change."""
    block_size: Literal[16, 32, 64, 128, 256] | None = None
    """int4, int8 (language models): weights per quantization block (default 32)."""
    greedy_tokens: Annotated[int, Field(ge=0, le=4096)] | None = None
    """Language models: N of the `greedy-match` gate, the greedy tokens compared per eval sample (default 16)."""


class GateCheck(ApiModel):
    """One fidelity check of a variant against the full model on the evaluation inputs."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self.metric != 'cosine' || (self.threshold >= -1.0 && self.threshold <= 1.0)",
                "gate[].threshold must be between -1 and 1 for metric cosine",
                field_path=".threshold",
            ),
            cel(
                "self.metric != 'top1-agreement' || (self.threshold >= 0.0 && self.threshold <= 1.0)",
                "gate[].threshold must be between 0 and 1 for metric top1-agreement",
                field_path=".threshold",
            ),
            cel(
                "self.metric != 'max-abs-error' || self.threshold >= 0.0",
                "gate[].threshold must be >= 0 for metric max-abs-error",
                field_path=".threshold",
            ),
            cel(
                "self.metric != 'kl' || self.threshold >= 0.0",
                "gate[].threshold must be >= 0 for metric kl",
                field_path=".threshold",
            ),
            cel(
                "self.metric != 'perplexity' || self.threshold > 0.0",
                "gate[].threshold must be > 0 for metric perplexity (a ratio)",
                field_path=".threshold",
            ),
            cel(
                "self.metric != 'greedy-match' || (self.threshold >= 0.0 && self.threshold <= 1.0)",
                "gate[].threshold must be between 0 and 1 for metric greedy-match",
                field_path=".threshold",
            ),
            cel(
                "!(self.metric in ['kl', 'greedy-match']) || self.stat == 'mean'",
                "gate[].stat must be mean for metrics kl and greedy-match",
                field_path=".stat",
            ),
            cel(
                "self.stat != 'ratio' || self.metric == 'perplexity'",
                "gate[].stat ratio applies only to metric perplexity",
                field_path=".stat",
            ),
            cel(
                "self.metric != 'perplexity' || self.stat in ['mean', 'ratio']",
                "gate[].stat must be ratio (or the default mean, read as ratio) for metric perplexity",
                field_path=".stat",
            ),
        )
    )

    metric: GateMetric
    """`cosine` similarity of outputs, `top1-agreement` of argmax, or `max-abs-error`. Language models:
    `kl` (mean KL of next-token distributions, full model as reference), `top1-agreement` (per position),
    `perplexity` (variant / full) or `greedy-match` (share of the first `greedyTokens` greedy tokens equal)."""
    stat: GateStat = "mean"
    """Statistic over the evaluation samples: `mean`, `min` or `p5` (5th percentile); `ratio` for perplexity."""
    op: GateOp
    """How the measured statistic must compare with `threshold`."""
    threshold: float
    """cosine: -1..1; top1-agreement, greedy-match: 0..1; max-abs-error, kl: >= 0; perplexity: > 0."""

    @model_validator(mode="after")
    def _threshold_in_range(self) -> GateCheck:
        t = self.threshold
        if self.metric == "cosine" and not -1.0 <= t <= 1.0:
            raise ValueError("gate[].threshold must be between -1 and 1 for metric cosine")
        if self.metric == "top1-agreement" and not 0.0 <= t <= 1.0:
            raise ValueError("gate[].threshold must be between 0 and 1 for metric top1-agreement")
        if self.metric == "max-abs-error" and t < 0.0:
            raise ValueError("gate[].threshold must be >= 0 for metric max-abs-error")
        if self.metric == "kl" and t < 0.0:
            raise ValueError("gate[].threshold must be >= 0 for metric kl")
        if self.metric == "perplexity" and t <= 0.0:
            raise ValueError("gate[].threshold must be > 0 for metric perplexity (a ratio)")
        if self.metric == "greedy-match" and not 0.0 <= t <= 1.0:
            raise ValueError("gate[].threshold must be between 0 and 1 for metric greedy-match")
        if self.metric in ("kl", "greedy-match") and self.stat != "mean":
            raise ValueError("gate[].stat must be mean for metrics kl and greedy-match")
        if self.stat == "ratio" and self.metric != "perplexity":
            raise ValueError("gate[].stat ratio applies only to metric perplexity")
        if self.metric == "perplexity" and self.stat not in ("mean", "ratio"):
            raise ValueError(
                "gate[].stat must be ratio (or the default mean, read as ratio) for metric perplexity"
            )
        return self

    def passes(self, value: float) -> bool:
        """Whether a measured statistic satisfies this check."""
        if self.op == ">=":
            return value >= self.threshold
        if self.op == ">":
            return value > self.threshold
        if self.op == "<=":
            return value <= self.threshold
        return value < self.threshold


def _default_gate() -> list[GateCheck]:
    return [GateCheck(metric="cosine", stat="mean", op=">=", threshold=0.99)]


_OPTION_METHODS: dict[str, tuple[str, ...]] = {
    "calibrationSamples": ("int8-static",),
    "studentWidth": ("distilled",),
    "studentDepth": ("distilled",),
    "quantize": ("distilled",),
    "perChannel": ("int8-dynamic", "int8-static", "distilled"),
    "reduceRange": ("int8-dynamic", "int8-static", "distilled"),
    "keepIoTypes": ("fp16",),
    "blockSize": ("int4", "int8"),
    "greedyTokens": ("int4", "int8", "fp16"),
}


def _option_rule(option: str, methods: tuple[str, ...]) -> dict[str, str]:
    allowed = " || ".join(f"self.method == '{m}'" for m in methods)
    return cel(
        f"!has(self.options) || !has(self.options.{option}) || {allowed}",
        f"variants[].options.{option} applies only to method {' or '.join(methods)}",
        field_path=f".options.{option}",
    )


class Variant(ApiModel):
    """A compressed variant of the model, built and verified by the compression Job."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(*(_option_rule(o, m) for o, m in _OPTION_METHODS.items()))
    )

    name: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    """Unique within the ModelDeployment; part of child object names."""
    method: VariantMethod
    """`int8-dynamic` (weights int8, activations quantized at run time), `int8-static` (calibrated activation
    scales), `fp16` (half precision, for edge GPUs) or `distilled` (a smaller student trained on the model).
    Language models (`hf`, `gguf`): `int4` or `int8` (weight-only, auto-tuned to the smallest that passes) and
    `fp16`."""
    options: VariantOptions = Field(default_factory=VariantOptions)
    gate: Annotated[list[GateCheck], Field(min_length=1, max_length=MAX_GATES)] = Field(
        default_factory=_default_gate
    )
    """All checks must pass or the variant is rejected and never reaches a node. For a language model the
    default (`cosine mean >= 0.99`) stands for the method's language-model default (int8: kl mean <= 0.01 and
    top1-agreement >= 0.97; int4: kl mean <= 0.1 and top1-agreement >= 0.88; fp16: kl mean <= 0.001 and
    top1-agreement >= 0.99)."""
    requires: NodeRequirements = Field(default_factory=NodeRequirements)
    """Node capabilities this variant needs. A node gets the first variant, in list order, it satisfies."""

    @model_validator(mode="after")
    def _options_fit_method(self) -> Variant:
        given = self.options.model_dump(by_alias=True, exclude_none=True)
        for option, methods in _OPTION_METHODS.items():
            if option in given and self.method not in methods:
                raise ValueError(f"variants[].options.{option} applies only to method {' or '.join(methods)}")
        return self


class FallbackSpec(ApiModel):
    """Cascade inference: when an edge runtime forwards a request to the cloud endpoint."""

    enabled: bool = True
    """Forward when the local model is not ready or the queue is full."""
    confidence_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Also forward when the top softmax probability is below this; unset disables the check."""
    queue_limit: Annotated[int, Field(ge=1, le=100000)] = 32
    """Requests waiting locally beyond this go to the cloud."""


CollaborationMode = Literal["edge-only", "cloud-only", "speculative", "cascade"]
CascadeMetric = Literal["margin", "top1", "entropy"]
CascadeCheck = Literal["off", "handoffs", "full"]
# Modes in which the edge talks to the cloud tier per token.
CLOUD_MODES = ("cloud-only", "speculative", "cascade")
MAX_ENTROPY_NATS = 20.0
_CASCADE_ONLY = "edge.collaboration.cascade applies only to mode cascade"
_SPECULATIVE_ONLY = "edge.collaboration.speculative applies only to mode speculative"
_THRESHOLD_SHARE = "edge.collaboration.cascade.threshold must be between 0 and 1 for metric margin or top1"
_K_OVER_MAX = "edge.collaboration.speculative.k must not exceed edge.collaboration.speculative.maxK"


class CascadeSpec(ApiModel):
    """`cascade`: the edge generates while its uncertainty stays at or under `threshold`; past it the cloud
    continues from the prefix."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self.metric == 'entropy' || self.threshold <= 1.0",
                _THRESHOLD_SHARE,
                field_path=".threshold",
            )
        )
    )

    metric: CascadeMetric = "margin"
    """Per-token uncertainty: `margin` (1 - (top-1 - runner-up probability)), `top1` (1 - top-1 probability)
    or `entropy` (of the next-token distribution, in nats). `kiri serve --cascade-metric`."""
    threshold: Annotated[float, Field(ge=0.0, le=MAX_ENTROPY_NATS)] = 0.7
    """Hand off above this uncertainty: 0..1 for `margin` and `top1`, 0..20 nats for `entropy`.
    `--cascade-threshold`."""
    window: Annotated[int, Field(ge=1, le=64)] = 1
    """Tokens the uncertainty is averaged over. `--cascade-window`."""
    cloud_tokens: Annotated[int, Field(ge=0, le=4096)] = 0
    """Tokens the cloud produces per hand-off before the edge resumes; 0: the cloud finishes the answer.
    `--cascade-cloud-tokens`."""
    check: CascadeCheck = "full"
    """What the cloud checks of the edge's tokens, with no extra round trip per hand-off: `off` (edge tokens
    stream as the edge makes them; an int4 flip the uncertainty misses stands), `handoffs` (the edge tokens since
    the last check go with each hand-off's call, scored in the same forward pass; the first one the cloud
    refuses is replaced by the cloud's and the edge resumes after it), or `full` (that, and one more call at the
    answer's end for its tail: every token checked; under greedy decoding the answer is the cloud's greedy
    answer). Checked tokens reach the client once checked. `--cascade-check`."""

    @model_validator(mode="after")
    def _threshold_fits_metric(self) -> CascadeSpec:
        if self.metric != "entropy" and self.threshold > 1.0:
            raise ValueError(_THRESHOLD_SHARE)
        return self


class SpeculativeSpec(ApiModel):
    """`speculative`: the edge drafts `k` tokens, the cloud verifies them in one forward pass (lossless)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(cel("self.k <= self.maxK", _K_OVER_MAX, field_path=".k"))
    )

    k: Annotated[int, Field(ge=0, le=64)] = 0
    """Draft tokens per verify round; 0 adapts k to the measured acceptance rate and round trip.
    `--speculative-k`."""
    max_k: Annotated[int, Field(ge=1, le=64)] = 12
    """Upper bound of the adaptive k. `--speculative-max-k`."""

    @model_validator(mode="after")
    def _k_within_max(self) -> SpeculativeSpec:
        if self.k > self.max_k:
            raise ValueError(_K_OVER_MAX)
        return self


class CollaborationSpec(ApiModel):
    """Edge-cloud collaborative generation of a language model, token by token (docs/operations.md
    "Edge-cloud collaboration"). The edge pods' cloud tier is this ModelDeployment's cloud Service."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel("!has(self.cascade) || self.mode == 'cascade'", _CASCADE_ONLY, field_path=".cascade"),
            cel(
                "!has(self.speculative) || self.mode == 'speculative'",
                _SPECULATIVE_ONLY,
                field_path=".speculative",
            ),
        )
    )

    mode: CollaborationMode = "edge-only"
    """`edge-only` (the edge answers; the cloud only when the edge is not ready or overloaded), `cloud-only`,
    `speculative` or `cascade`. A request may pick another (body field `kiri.collaboration`)."""
    cascade: CascadeSpec | None = None
    """Settings of mode `cascade` (its defaults when unset)."""
    speculative: SpeculativeSpec | None = None
    """Settings of mode `speculative` (its defaults when unset)."""

    @model_validator(mode="after")
    def _settings_fit_mode(self) -> CollaborationSpec:
        if self.cascade is not None and self.mode != "cascade":
            raise ValueError(_CASCADE_ONLY)
        if self.speculative is not None and self.mode != "speculative":
            raise ValueError(_SPECULATIVE_ONLY)
        return self


CACHE_PATH_REFUSED = (
    "edge.cache.path is no longer a spec field: the node cache is the cluster admin's (the chart's"
    " edgeCache.root), split per namespace and model; remove it"
)


class CacheSpec(ApiModel):
    """The node-local, content-addressed artifact cache. Where it lives on the node is the cluster admin's
    choice (the chart's `edgeCache.root`); each ModelDeployment gets its own `<root>/<namespace>/<name>/`."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            # The old default passes, so objects stored (and defaulted) by older versions still validate.
            cel(
                f"!has(self.path) || self.path == '{DEFAULT_CACHE_PATH}'",
                CACHE_PATH_REFUSED,
                field_path=".path",
            )
        )
    )

    path: Annotated[str, Field(max_length=255)] | None = None
    """Deprecated and ignored: refused unless unset or the old default `/var/lib/kiri/cache` (which objects
    stored by Kiri 0.1 carry)."""
    revisions_kept: Annotated[int, Field(ge=1, le=10)] = 2
    """Revisions kept on each node; at least the previous one stays so a rollback needs no download."""

    @model_validator(mode="after")
    def _no_host_path(self) -> CacheSpec:
        if self.path is not None and self.path != DEFAULT_CACHE_PATH:
            raise ValueError(CACHE_PATH_REFUSED)
        return self


class ArtifactsSpec(ApiModel):
    """Where the compression Job writes verified variants, and where edge nodes fetch them from."""

    uri: Uri | None = None
    """Store the Job writes to: `http(s)://host/path` (a server taking PUT, e.g. the chart's in-cluster
    store `kiri store`: the Job uploads there), `file:///path` (a host path on the cloud node, shared with the
    edge nodes, e.g. NFS) or `pvc://claim/path`. Each compression gets its own
    `<uri>/<namespace>/<name>/<key>/`. Unset: the operator's default store (`--default-artifacts-uri`; the
    chart sets its in-cluster store), else `file:///var/lib/kiri/artifacts`; with `learning`, whose rounds
    are written in place and not uploaded, always `file:///var/lib/kiri/artifacts`."""
    fetch_uri: Uri | None = None
    """Base URI edge nodes fetch the same files from (e.g. an HTTP server in front of the store); `uri` when
    unset."""
    credentials: StoreCredentials | None = None
    """How edge pods authenticate to `fetchUri` (an `s3://` or `http(s)://` store)."""


MAX_ADAPTERS = 16
MAX_ADAPTER_SITES = 16
AdapterMetric = Literal["perplexity", "loss", "accuracy"]
# Held-out metrics where a smaller value is better; the others (accuracy) are better larger.
LOWER_IS_BETTER: tuple[str, ...] = ("perplexity", "loss")
# What `kiri serve --adapter` accepts as a name (runtime/kiri_runtime/adapters.py NAME); `base` is the
# runtime's name for "no adapter" (`model:base`).
ADAPTER_NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
ADAPTER_BASE_NAME = "base"
_ADAPTER_NAME_BASE = "edge.adapters[].name must not be 'base': `model:base` is the base model without adapter"
_ADAPTER_PVC = (
    "edge.adapters[].uri: pvc:// is not supported for adapters (edge pods fetch them); use file://, "
    "http(s):// or s3://"
)
_ADAPTER_SITES_UNIQUE = "edge.adapters[].sites must not name a site twice"
_ADAPTER_NAMES_UNIQUE = "edge.adapters[].name must be unique"
_ADAPTER_ONE_DEFAULT = "edge.adapters: at most one adapter per site may be its default (default: true)"
_ADAPTERS_NEED_LM = (
    "edge.adapters are LoRA adapters of a causal language model: model.source.format must be hf or gguf"
)


class OtherSiteMetric(ApiModel):
    """The adapter on another site's held-out text: the site where it does worst against the base."""

    site: (
        Annotated[
            str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
        ]
        | None
    ) = None
    """That site (the site label's value), for messages."""
    base: Annotated[float, Field(ge=0)]
    """The base model's value on that site's held-out text."""
    adapter: Annotated[float, Field(ge=0)]
    """The value with the adapter on the same text."""


class HeldOutMetric(ApiModel):
    """What the adapter's producer measured on the site's held-out text, for the base model and for the
    adapter. The rollout refuses an adapter that does worse than the base (`AdapterWorseThanBase`)."""

    metric: AdapterMetric
    """`perplexity` or `loss` (lower is better) or `accuracy` (higher is better)."""
    base: Annotated[float, Field(ge=0)]
    """The base model's value on the site's held-out text."""
    adapter: Annotated[float, Field(ge=0)]
    """The value with the adapter on the same text."""
    current: Annotated[float, Field(ge=0)] | None = None
    """The value, on the same text, of the adapter of this name that the site serves now (omit for a new
    adapter): `rollout.updatePolicy.minImprovement` is measured against it, else against `base`."""

    worst_other_site: OtherSiteMetric | None = None
    """The same metric on the held-out text of the other site where the adapter does worst against the
    base: `rollout.updatePolicy.maxOtherSiteRegression` bounds how much it may hurt it."""

    def worse(self) -> bool:
        """The adapter does worse than the base (equal is not worse)."""
        if self.metric in LOWER_IS_BETTER:
            return self.adapter > self.base
        return self.adapter < self.base

    def gain(self) -> float:
        """The improvement over `current` (else `base`), as `minImprovement` counts it: accuracy's rise and
        loss's drop as differences, perplexity's drop relative to the reference (a scale-free share, close
        to the drop in loss it stands for)."""
        reference = self.base if self.current is None else self.current
        if self.metric == "accuracy":
            return self.adapter - reference
        if self.metric == "loss":
            return reference - self.adapter
        return 0.0 if reference == 0 else (reference - self.adapter) / reference

    def other_site_regression(self) -> float | None:
        """How much worse than the base the adapter does on `worstOtherSite`'s text, as `gain` counts a gain
        (accuracy's drop, loss's rise, perplexity's relative rise); None when not measured."""
        other = self.worst_other_site
        if other is None:
            return None
        if self.metric == "accuracy":
            return other.base - other.adapter
        if self.metric == "loss":
            return other.adapter - other.base
        return 0.0 if other.base == 0 else (other.adapter - other.base) / other.base


class AdapterSpec(ApiModel):
    """A LoRA adapter (`.onnx_adapter`) that edge pods of the named sites load beside the base model. A
    request picks it as `<model.name>:<name>` (vLLM's and LoRAX's convention); a site's default adapter
    answers the bare `<model.name>`. The variants must be built LoRA-ready (`options.loraTargets`)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(f"self.name != '{ADAPTER_BASE_NAME}'", _ADAPTER_NAME_BASE, field_path=".name"),
            cel("!self.uri.startsWith('pvc://')", _ADAPTER_PVC, field_path=".uri"),
        )
    )

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=ADAPTER_NAME_PATTERN)]
    """Unique in the ModelDeployment: what a request names after the colon."""
    uri: Uri
    """`file://`, `http(s)://` or `s3://` URI of the `.onnx_adapter` file; fetched with
    `edge.artifacts.credentials`."""
    sha256: Sha256
    """Hex sha256 of the file; the runtime refuses any other."""
    size_bytes: Annotated[int, Field(ge=1)]
    """The file's size: `rollout.updatePolicy.maxBytesPerDay` counts it for every node that fetches it."""
    sites: Annotated[
        list[
            Annotated[
                str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
            ]
        ],
        Field(
            min_length=1,
            max_length=MAX_ADAPTER_SITES,
            json_schema_extra=cel_rules(
                cel("self.all(s, self.exists_one(t, t == s))", _ADAPTER_SITES_UNIQUE)
            ),
        ),
    ]
    """The sites whose edge nodes load it: values of the site label (`learning.siteLabel`, else
    `kiri.dev/site`)."""
    default: bool = False
    """The adapter a bare `<model.name>` gets on these sites; at most one per site. No default: the bare
    name is the base model."""
    held_out: HeldOutMetric | None = None
    """The producer's held-out measurement; when given, an adapter worse than the base never rolls out."""

    @model_validator(mode="after")
    def _valid(self) -> AdapterSpec:
        if self.name == ADAPTER_BASE_NAME:
            raise ValueError(_ADAPTER_NAME_BASE)
        if self.uri.startswith("pvc://"):
            raise ValueError(_ADAPTER_PVC)
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(_ADAPTER_SITES_UNIQUE)
        return self


class EdgeSpec(ApiModel):
    """Compressed variants rolled onto labeled edge nodes."""

    node_selector: Annotated[dict[str, LabelValue], Field(max_length=32)] = {TIER_LABEL: "edge"}
    """Which nodes form the edge fleet."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = []
    """Tolerations of the edge pods (e.g. for sites that taint their nodes). A selected node with a
    NoSchedule or NoExecute taint they do not tolerate is not a rollout target (no pod can run there)."""
    pod_labels: Annotated[dict[str, LabelValue], Field(max_length=32)] = {}
    """Extra labels on edge pods (e.g. for a Prometheus scrape selector). Part of the revision: changing
    them rolls out in waves like any other change."""
    variants: Annotated[
        list[Variant],
        Field(
            max_length=MAX_VARIANTS,
            json_schema_extra=cel_rules(
                cel(
                    "self.all(v, self.exists_one(w, w.name == v.name))",
                    "edge.variants[].name must be unique",
                )
            ),
        ),
    ] = []
    """Empty: cloud serving only, nothing goes to edge nodes."""
    fallback: FallbackSpec = Field(default_factory=FallbackSpec)
    collaboration: CollaborationSpec | None = None
    """Language models (`hf`, `gguf`): how the edge works with the cloud tier token by token. Part of the
    revision: changing it rolls out in waves like any other change. Unset: `edge-only`."""
    cache: CacheSpec = Field(default_factory=CacheSpec)
    artifacts: ArtifactsSpec = Field(default_factory=ArtifactsSpec)
    service_account_name: ServiceAccountName | None = None
    """Service account of the edge pods. Its token is not mounted into the serving container. Unset: the
    namespace's `default`."""
    adapters: Annotated[
        list[AdapterSpec],
        Field(
            max_length=MAX_ADAPTERS,
            json_schema_extra=cel_rules(
                cel("self.all(a, self.exists_one(b, b.name == a.name))", _ADAPTER_NAMES_UNIQUE),
                cel(
                    "self.all(a, !a.default || a.sites.all(s, self.exists_one(b, b.default && s in b.sites)))",
                    _ADAPTER_ONE_DEFAULT,
                ),
            ),
        ),
    ] = []
    """Language models: LoRA adapters per site. A change to one site's adapters rolls out on that site
    alone, as its own small wave (one canary node, then the rest, with the rollout's health gates), and
    rolls back to the site's previous adapters when it fails; other sites are untouched. Not part of the
    revision."""

    @model_validator(mode="after")
    def _unique(self) -> EdgeSpec:
        _names_unique(self.variants, "edge.variants[].name")
        _names_unique(self.adapters, "edge.adapters[].name")
        defaults: dict[str, int] = {}
        for adapter in self.adapters:
            for site in adapter.sites if adapter.default else ():
                defaults[site] = defaults.get(site, 0) + 1
        if any(n > 1 for n in defaults.values()):
            raise ValueError(_ADAPTER_ONE_DEFAULT)
        return self


# --- rollout -----------------------------------------------------------------------------------------


class RolloutStage(ApiModel):
    """One wave. `nodes` and `percent` are cumulative: how many edge nodes run the new revision after it."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "has(self.nodes) != has(self.percent)",
                "stages[]: set exactly one of stages[].nodes or stages[].percent",
            )
        )
    )

    nodes: Annotated[int, Field(ge=1, le=100000)] | None = None
    """Absolute node count (e.g. 1 for a canary)."""
    percent: Annotated[int, Field(ge=1, le=100)] | None = None
    """Share of the target nodes, rounded up."""
    bake_seconds: Annotated[int, Field(ge=0, le=86400)] = 0
    """Time the wave must stay healthy before the next one starts."""
    pause: bool = False
    """Wait for `kiri promote` after this wave."""

    @model_validator(mode="after")
    def _one_size(self) -> RolloutStage:
        if (self.nodes is None) == (self.percent is None):
            raise ValueError("stages[]: set exactly one of stages[].nodes or stages[].percent")
        return self


def _default_stages() -> list[RolloutStage]:
    return [RolloutStage(percent=100)]


_STAGES_RULES = cel_rules(
    cel(
        "self.map(s, has(s.percent), s.percent).isSorted()"
        " && self.map(s, has(s.percent), s.percent).all(p, self.exists_one(s, has(s.percent) && s.percent == p))",
        "rollout.stages[].percent must strictly increase from stage to stage",
    ),
    cel(
        "self.map(s, has(s.nodes), s.nodes).isSorted()"
        " && self.map(s, has(s.nodes), s.nodes).all(n, self.exists_one(s, has(s.nodes) && s.nodes == n))",
        "rollout.stages[].nodes must strictly increase from stage to stage",
    ),
    cel(
        "self.map(s, has(s.percent) ? 1 : 0).isSorted()",
        "rollout.stages: stages with nodes must come before stages with percent",
    ),
    cel(
        "has(self[size(self) - 1].percent) && self[size(self) - 1].percent == 100",
        "rollout.stages: the last stage must be percent: 100 so the rollout reaches every node",
    ),
)


class PrometheusSpec(ApiModel):
    """The Prometheus the operator queries. The operator only queries addresses its administrator allowed
    (chart value `analysis.allowedPrometheus`, flag `--allowed-prometheus`); any other address is refused
    with `Ready=False` (`PrometheusNotAllowed`) and nothing is applied."""

    address: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^https?://[^\s]+$")]
    """Base URL of the Prometheus HTTP API, one of the operator's allowed addresses, e.g.
    `http://prometheus-operated.monitoring.svc:9090`."""


_QUERY_XOR_PRESET = "analysis.queries[]: set exactly one of query or preset"
_RELATIVE_NEEDS_PRESET = (
    "analysis.queries[].relativeToStable applies only to preset ttft-p95, itl-p95 or handoff-ratio"
    " (an error ratio is gated absolutely; a raw query can use $stableRevision itself)"
)


class AnalysisQuery(ApiModel):
    """A PromQL query (or a named preset for language models) evaluated every `interval` during a wave's bake
    time."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel("has(self.query) != has(self.preset)", _QUERY_XOR_PRESET),
            cel(
                "!has(self.relativeToStable) || !self.relativeToStable"
                " || has(self.preset) && self.preset in ['ttft-p95', 'itl-p95', 'handoff-ratio']",
                _RELATIVE_NEEDS_PRESET,
                field_path=".relativeToStable",
            ),
        )
    )

    name: Name
    """Unique name, used in events and conditions."""
    query: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    """PromQL returning one scalar or a one-element vector. `$revision`, `$stableRevision` (the last revision that
    reached every node, which the nodes not yet updated still run; empty on a first rollout), `$variant`,
    `$namespace`, `$adapters` and `$stableAdapters` are substituted before it runs. The last two are regular
    expressions on the pods' `adapters` label: `.*` in a revision's rollout; in a site's adapter wave (which
    the same queries judge) its adapter revision and the site's stable one ("" for the base model), so
    `adapters=~"$adapters"` selects the site's canary. Exactly one of `query` and `preset`."""
    preset: AnalysisPreset | None = None
    """A named query on the language-model metrics of the update revision's edge pods: `ttft-p95` (seconds
    to the first token, 95th percentile), `itl-p95` (seconds between tokens, 95th percentile), `error-ratio`
    (5xx over all requests) or `handoff-ratio` (the cascade's uncertainty hand-offs per answer token). The
    rate window is two intervals, at least 60s. docs/operations.md lists the PromQL each stands for."""
    relative_to_stable: bool = False
    """Presets `ttft-p95`, `itl-p95`, `handoff-ratio`: the result is the update revision's value over the
    stable revision's (floored at 0.001), so `result <= 1.2` allows 20% worse; 1 while there is no stable
    revision with data."""
    success_condition: Annotated[
        str,
        Field(
            min_length=1,
            max_length=256,
            pattern=r"^\s*result\s*(>=|<=|==|!=|>|<)\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$",
        ),
    ]
    """`result <op> <number>`, e.g. `result >= 0.95`. No code is evaluated."""
    interval: Annotated[int, Field(ge=1, le=3600)] = 30
    """Seconds between measurements."""
    failure_limit: Annotated[int, Field(ge=0, le=1000)] = 0
    """Failed measurements tolerated; one more fails the wave and rolls back."""
    min_samples: Annotated[int, Field(ge=1, le=1000)] = 1
    """Measurements with data needed for a verdict. Fewer is inconclusive: the wave holds, no rollback."""

    @model_validator(mode="after")
    def _query_or_preset(self) -> AnalysisQuery:
        if (self.query is None) == (self.preset is None):
            raise ValueError(_QUERY_XOR_PRESET)
        if self.relative_to_stable and self.preset not in PRESET_FLOORS:
            raise ValueError(_RELATIVE_NEEDS_PRESET)
        return self

    @property
    def promql(self) -> str:
        """The query to run, before substitution: `query`, or the preset's PromQL."""
        if self.query is not None:
            return self.query
        assert self.preset is not None
        return preset_promql(self.preset, self.interval, self.relative_to_stable)


class AnalysisSpec(ApiModel):
    """Metric gates between waves."""

    prometheus: PrometheusSpec
    """The Prometheus that scrapes the edge runtimes."""
    queries: Annotated[
        list[AnalysisQuery],
        Field(
            min_length=1,
            max_length=MAX_QUERIES,
            json_schema_extra=cel_rules(
                cel(
                    "self.all(q, self.exists_one(r, r.name == q.name))",
                    "analysis.queries[].name must be unique",
                )
            ),
        ),
    ]
    """Queries checked during each wave's bake time; all must succeed before the next wave."""

    @model_validator(mode="after")
    def _unique(self) -> AnalysisSpec:
        _names_unique(self.queries, "analysis.queries[].name")
        return self


class BandwidthSpec(ApiModel):
    """Limits on artifact downloads, for sites behind thin links."""

    max_concurrent_downloads: Annotated[int, Field(ge=1, le=100000)] | None = None
    """Nodes fetching at once, fleet-wide; the rest of a wave waits its turn."""
    max_bytes_per_wave: Annotated[int, Field(ge=1)] | None = None
    """Artifact bytes a single wave may pull; larger waves are split."""


class RolloutSpec(ApiModel):
    """How a new revision reaches the edge nodes."""

    stages: Annotated[
        list[RolloutStage], Field(min_length=1, max_length=MAX_STAGES, json_schema_extra=_STAGES_RULES)
    ] = Field(default_factory=_default_stages)
    """Waves in order. The last one must be `percent: 100`."""
    group_by: LabelKey | None = None
    """Node label (e.g. `kiri.dev/site`): the stages run within one group at a time, site by site."""
    max_unavailable: IntOrPercent = 1
    """Nodes (or percent of a wave) switching at the same moment."""
    offline_nodes: OfflinePolicy = "Skip"
    """NotReady nodes: `Skip` defers them (they converge when back), `Wait` holds the wave, `Fail` rolls back."""
    progress_deadline_seconds: Annotated[int, Field(ge=1, le=86400)] = 600
    """A wave whose nodes are not Ready by then fails its readiness gate."""
    analysis: AnalysisSpec | None = None
    bandwidth: BandwidthSpec | None = None
    paused: bool = False
    """Hold at the current wave; the cloud keeps serving."""
    revision_history_limit: Annotated[int, Field(ge=1, le=100)] = 10
    """Entries kept in `status.history`, and old revisions' objects kept for rollback."""
    update_policy: UpdatePolicy | None = None
    """Rate limits on new revisions: deferred ones, and why, show in `status.learning.update`."""

    @model_validator(mode="after")
    def _stages_well_ordered(self) -> RolloutSpec:
        percents = [s.percent for s in self.stages if s.percent is not None]
        nodes = [s.nodes for s in self.stages if s.nodes is not None]
        if any(b <= a for a, b in itertools.pairwise(percents)):
            raise ValueError("rollout.stages[].percent must strictly increase from stage to stage")
        if any(b <= a for a, b in itertools.pairwise(nodes)):
            raise ValueError("rollout.stages[].nodes must strictly increase from stage to stage")
        kinds = [s.percent is not None for s in self.stages]
        if kinds != sorted(kinds):
            raise ValueError("rollout.stages: stages with nodes must come before stages with percent")
        if self.stages and self.stages[-1].percent != 100:
            raise ValueError(
                "rollout.stages: the last stage must be percent: 100 so the rollout reaches every node"
            )
        return self


# --- learning ----------------------------------------------------------------------------------------

TrainedPartKind = Literal["whole", "layers", "lora"]
Aggregation = Literal["fedavg", "trimmed-mean"]
LearningPolicy = Literal["perSite", "federated"]
FACTORY_PATTERN = r"^([A-Za-z_][A-Za-z0-9_.]*|[^:\s]+\.py):[A-Za-z_][A-Za-z0-9_]*$"
ABSOLUTE_PATH_PATTERN = r"^/[^\s]*$"


class TrainableModel(ApiModel):
    """The full-precision PyTorch model that edge sites fine-tune (an ONNX graph cannot be trained)."""

    factory: Annotated[str, Field(min_length=3, max_length=256, pattern=FACTORY_PATTERN)]
    """`pkg.module:function` returning a `torch.nn.Module`, importable in the runtime image."""
    weights_uri: Uri
    """The weights of the first round: a safetensors file (`.safetensors`) or a
    `torch.save(model.state_dict())` file (`.pt`, loaded with `weights_only=True`). Later rounds start from the
    last accepted round's published weights (safetensors)."""
    weights_sha256: Sha256
    """Hex sha256 of the file at `weightsUri`."""


class TrainedPart(ApiModel):
    """Which parameters sites train; the smaller the part, the smaller each upload."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "self.kind != 'layers' || (has(self.layers) && size(self.layers) > 0)",
                "learning.trained.layers must name at least one layer when kind is layers",
                field_path=".layers",
            )
        )
    )

    kind: TrainedPartKind = "lora"
    """`whole` (every parameter), `layers` (parameters under the named prefixes) or `lora` (a rank-`rank`
    adapter on Linear layers, with a frozen random A, so only B is uploaded)."""
    layers: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=64)] = []
    """For `layers`: parameter name prefixes (e.g. `head`). For `lora`: Linear module names (empty: all)."""
    rank: Annotated[int, Field(ge=1, le=256)] = 4
    """LoRA rank."""
    steps: Annotated[int, Field(ge=1, le=100000)] = 50
    """Language models: optimizer steps per site per round (minibatches of `batchSize` windows)."""
    sequence_length: Annotated[int, Field(ge=8, le=32768)] = 128
    """Language models: tokens per training window of the site's text."""

    @model_validator(mode="after")
    def _layers_named(self) -> TrainedPart:
        if self.kind == "layers" and not self.layers:
            raise ValueError("learning.trained.layers must name at least one layer when kind is layers")
        return self


class DifferentialPrivacySpec(ApiModel):
    """Client-level differential privacy (DP-FedAvg): each site clips its update and adds Gaussian noise."""

    clip_norm: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    """L2 bound on one site's update in one round."""
    noise_multiplier: Annotated[float, Field(ge=0, le=1e4)] = 1.0
    """Noise standard deviation as a multiple of `clipNorm`."""
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None
    """The delta of (epsilon, delta)-DP, well below 1 / the number of sites; 1e-5 when unset. (No schema
    default: 1e-05 in JSON reads back as a string in YAML 1.1 tools.)"""
    target_epsilon: Annotated[float, Field(gt=0, le=1000)] = 8.0
    """Privacy budget per site. A round that would take any site past it is refused."""


class LearningSchedule(ApiModel):
    """When rounds run and how long one may take."""

    interval_seconds: Annotated[int, Field(ge=60, le=31536000)] = 86400
    """Seconds from the close of one round to the start of the next (the first round starts at once): a round
    that runs long never makes the next one start before it has closed."""
    deadline_seconds: Annotated[int, Field(ge=10, le=86400)] = 1800
    """A round closes at the latest this long after it opens."""
    grace_seconds: Annotated[int, Field(ge=0, le=86400)] = 120
    """Once `minClients` updates arrived, wait this long for the rest, then close: stragglers do not stall it."""


_LEARNED_NAME_BASE = "learning.adapterName must not be 'base': `model:base` is the base model without adapter"
_TRIMMED_NEEDS_CLEAR = (
    "learning.aggregation trimmed-mean needs each site's update in the clear: set learning.secureAggregation "
    "to false (SecAgg+ reveals only the sum)"
)


class LearningSpec(ApiModel):
    """Federated fine-tuning at the edge: sites train on local data and send only privatized updates."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "!has(self.clientsPerRound) || self.minClients <= self.clientsPerRound",
                "learning.minClients must not exceed learning.clientsPerRound",
                field_path=".minClients",
            ),
            cel(
                "self.aggregation != 'trimmed-mean' || (has(self.secureAggregation) && !self.secureAggregation)",
                _TRIMMED_NEEDS_CLEAR,
                field_path=".aggregation",
            ),
        )
    )

    mode: Literal["federated"] = "federated"
    """Only `federated`: raw site data never leaves the site."""
    policy: LearningPolicy = "federated"
    """`federated`: the sites' updates are aggregated through Flower (SecAgg+ by default) into one model
    (FedAvg; with `trained.kind: lora`, FFA-LoRA). `perSite`: each site trains and keeps its own result on
    its own nodes; nothing leaves the site but metrics (loss, sample count)."""
    secure_aggregation: bool = True
    """SecAgg+ (Flower's `SecAggPlusWorkflow`): the server sees only the sum of the sites' updates. Off only
    for `aggregation: trimmed-mean`, which needs each update in the clear, and every site must allow it."""
    trainable: TrainableModel | None = None
    """Tensor models: the PyTorch model sites fine-tune. Unset for a language model (`model.source.format:
    hf`): its sites train a LoRA adapter (`trained.kind: lora`) on the checkpoint itself."""
    trained: TrainedPart = Field(default_factory=TrainedPart)
    adapter_name: Annotated[
        str,
        Field(
            min_length=1,
            max_length=63,
            pattern=ADAPTER_NAME_PATTERN,
            json_schema_extra=cel_rules(cel(f"self != '{ADAPTER_BASE_NAME}'", _LEARNED_NAME_BASE)),
        ),
    ] = "learned"
    """Language models: the name the learned adapter is served under (`<model.name>:<adapterName>`). Each
    site's edge serves it as its default unless `edge.adapters` names another default for the site."""
    rounds: Annotated[int, Field(ge=1, le=10000)] = 10
    """Rounds to run in total; fewer when the privacy budget runs out."""
    clients_per_round: Annotated[int, Field(ge=1, le=100000)] | None = None
    """Sites asked per round (default: every site)."""
    min_clients: Annotated[int, Field(ge=1, le=100000)] = 2
    """Updates needed for a round to count; with fewer by the deadline it is skipped, with the reason."""
    local_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    """Passes over the site's data per round."""
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 0.05
    """Local SGD learning rate."""
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    """Local minibatch size."""
    aggregation: Aggregation = "fedavg"
    """`fedavg` (weighted by sample count) or `trimmed-mean` (coordinate-wise, robust to outlier sites)."""
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    """For `trimmed-mean`: fraction of values dropped at each end."""
    dp: DifferentialPrivacySpec = Field(default_factory=DifferentialPrivacySpec)
    schedule: LearningSchedule = Field(default_factory=LearningSchedule)
    site_data_path: Annotated[str, Field(min_length=2, max_length=255, pattern=ABSOLUTE_PATH_PATTERN)] = (
        "/var/lib/kiri/site-data/train.npz"
    )
    """Host path on each edge node of the `.npz` (arrays `x`, `y`) the site trains on. It is mounted read-only
    into the trainer and never sent anywhere."""
    eval_data_uri: Uri
    """Held-out `.npz` (arrays `x`, `y`) in the cloud: every round's loss and accuracy are measured on it."""
    site_label: LabelKey = "kiri.dev/site"
    """Node label that names a site: one trainer Job per site, pinned to that site's nodes."""
    trainer_service_account_name: ServiceAccountName | None = None
    """Service account of the trainer Jobs (no token is mounted). Unset: the namespace's `default`."""

    @model_validator(mode="after")
    def _clients(self) -> LearningSpec:
        if self.adapter_name == ADAPTER_BASE_NAME:
            raise ValueError(_LEARNED_NAME_BASE)
        if self.clients_per_round is not None and self.min_clients > self.clients_per_round:
            raise ValueError("learning.minClients must not exceed learning.clientsPerRound")
        if self.aggregation == "trimmed-mean" and self.secure_aggregation:
            raise ValueError(_TRIMMED_NEEDS_CLEAR)
        return self


class UpdatePolicy(ApiModel):
    """When a new revision (e.g. from a learning round) is worth the bandwidth of a rollout."""

    min_interval_seconds: Annotated[int, Field(ge=0, le=31536000)] = 0
    """Seconds that must pass since the last rollout started before another starts."""
    max_bytes_per_day: Annotated[int, Field(ge=1)] | None = None
    """Artifact bytes one site may download in 24 hours, computed from the manifest's variant sizes."""
    min_improvement: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Held-out accuracy gain (loss decrease for regression) a learned revision needs over the current one.
    Also the gain a site's new adapter needs when its `heldOut` is given, over the site's current adapter
    (`heldOut.current`) or else the base: accuracy's rise, loss's drop, or perplexity's relative drop."""
    max_other_site_regression: Annotated[float, Field(ge=0, le=1)] | None = None
    """How much a site's adapter may hurt another site, on the held-out text of the other site where it does
    worst (`heldOut.worstOtherSite`): accuracy's drop, loss's rise or perplexity's relative rise. An adapter
    that hurts more never rolls out (`AdapterHurtsOtherSites`). Unset: not checked."""


# --- the whole spec ----------------------------------------------------------------------------------

_IS_LM = "(self.model.source.format in ['hf', 'gguf'])"
_IS_DEFAULT_GATE = "v.gate.size() == 1 && g.stat == 'mean' && g.op == '>=' && g.threshold == 0.99"
_NEEDS_LM = (
    "variants[].method int4/int8 and gate metrics kl, perplexity and greedy-match need a causal language "
    "model: model.source.format hf or gguf"
)
_NEEDS_TENSOR_METHOD = (
    "a language model (model.source.format hf or gguf) takes edge.variants[].method int4, int8 or fp16"
)
_NEEDS_LM_METRIC = (
    "a language model (model.source.format hf or gguf) is gated (edge.variants[].gate) on kl, top1-agreement, "
    "perplexity or greedy-match, not cosine or max-abs-error"
)
_COLLAB_NEEDS_LM = (
    "edge.collaboration is for language models (model.source.format hf or gguf): a tensor model's edge "
    "forwards whole requests to the cloud (edge.fallback)"
)
_COLLAB_NEEDS_CLOUD = (
    "edge.collaboration.mode cloud-only, speculative and cascade need the cloud tier: cloud.replicas must be at "
    "least 1 and edge.fallback.enabled true (the edge reaches the cloud Service through it)"
)
_LEARNING_NEEDS_TRAINABLE = (
    "learning.trainable is required for a tensor model; a language model (model.source.format hf) is itself "
    "what sites train, as a LoRA adapter"
)
_LM_LEARNING_NO_TRAINABLE = (
    "learning.trainable must be unset for a language model: its sites train a LoRA adapter on model.source "
    "(a GGUF file cannot be trained: give the Hugging Face checkpoint, format hf)"
)
_LM_LEARNING_LORA = "learning.trained.kind must be lora for a language model: sites train and share adapters"
_LM_LEARNING_LOCAL = (
    "model.source.uri must be file:// or pvc:// for a language model that learns: the round's pods (the "
    "SuperLink in the cloud, a SuperNode per site) read the checkpoint directory in place"
)
_LEARNED_NAME_TAKEN = (
    "learning.adapterName names an adapter of edge.adapters: the learned adapter needs its own name"
)
_NEEDS_LM_EVAL = "model.evalDataUri is required for a language model with variants (JSON Lines of texts or chats to gate on)"


def is_default_gate(gate: list[GateCheck]) -> bool:
    """The API default (`cosine mean >= 0.99`): for a language model it stands for the method's LM default."""
    return gate == _default_gate()


class ModelDeploymentSpec(ApiModel):
    """One model: served in full in the cloud, rolled out compressed to the edge."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            cel(
                "!has(self.edge) || !has(self.edge.variants)"
                " || !self.edge.variants.exists(v, v.method == 'int8-static') || has(self.model.evalDataUri)",
                "model.evalDataUri is required when a variant uses method int8-static (it calibrates on real inputs)",
                field_path=".model.evalDataUri",
            ),
            cel(
                "!has(self.learning) || has(self.model.evalDataUri)",
                "model.evalDataUri is required with learning (learned weights are exported and checked on it)",
                field_path=".model.evalDataUri",
            ),
            cel(
                f"!has(self.edge) || !has(self.edge.variants) || {_IS_LM}"
                " || !self.edge.variants.exists(v, v.method in ['int4', 'int8'])"
                " && !self.edge.variants.exists(v, v.gate.exists(g, g.metric in ['kl', 'perplexity', 'greedy-match']))",
                _NEEDS_LM,
                field_path=".model.source.format",
            ),
            cel(
                f"!has(self.edge) || !has(self.edge.variants) || !{_IS_LM}"
                " || !self.edge.variants.exists(v, v.method in ['int8-dynamic', 'int8-static', 'distilled'])",
                _NEEDS_TENSOR_METHOD,
                field_path=".edge.variants",
            ),
            cel(
                f"!has(self.edge) || !has(self.edge.variants) || !{_IS_LM} || self.edge.variants.all(v,"
                " !v.gate.exists(g, g.metric == 'max-abs-error' || g.metric == 'cosine' && !("
                f"{_IS_DEFAULT_GATE})))",
                _NEEDS_LM_METRIC,
                field_path=".edge.variants",
            ),
            cel(
                f"!has(self.edge) || !has(self.edge.variants) || self.edge.variants.size() == 0 || !{_IS_LM}"
                " || has(self.model.evalDataUri)",
                _NEEDS_LM_EVAL,
                field_path=".model.evalDataUri",
            ),
            cel(
                "!has(self.cloud) || !has(self.cloud.runtime) || !has(self.cloud.runtime.engine)"
                " || self.cloud.runtime.engine != 'vllm' || self.model.source.format == 'hf'",
                VLLM_NEEDS_HF,
                field_path=".cloud.runtime.engine",
            ),
            cel(
                "!has(self.cloud) || !has(self.cloud.runtime) || !has(self.cloud.runtime.engine)"
                " || self.cloud.runtime.engine != 'vllm' || !has(self.cloud.resources)"
                " || !has(self.cloud.resources.gpu) || self.cloud.resources.gpu >= 1",
                VLLM_NEEDS_GPU,
                field_path=".cloud.resources.gpu",
            ),
            cel(
                "!has(self.cloud) || !has(self.cloud.runtime) || !has(self.cloud.runtime.device)"
                " || self.cloud.runtime.device != 'cuda' || !has(self.cloud.resources)"
                " || !has(self.cloud.resources.gpu) || self.cloud.resources.gpu >= 1",
                CUDA_NEEDS_GPU,
                field_path=".cloud.resources.gpu",
            ),
            cel(
                "!has(self.cloud) || !has(self.cloud.runtime) || !has(self.cloud.runtime.device)"
                " || self.cloud.runtime.device != 'cuda' || (self.cloud.runtime.engine != 'vllm'"
                f" && {_IS_LM})",
                CUDA_NEEDS_KIRI_LM,
                field_path=".cloud.runtime.device",
            ),
            cel(
                f"!has(self.edge) || !has(self.edge.adapters) || self.edge.adapters.size() == 0 || {_IS_LM}",
                _ADAPTERS_NEED_LM,
                field_path=".edge.adapters",
            ),
            cel(
                "!has(self.learning) || has(self.learning.trainable) || self.model.source.format == 'hf'",
                _LEARNING_NEEDS_TRAINABLE,
                field_path=".learning.trainable",
            ),
            cel(
                f"!has(self.learning) || !has(self.learning.trainable) || !{_IS_LM}",
                _LM_LEARNING_NO_TRAINABLE,
                field_path=".learning.trainable",
            ),
            cel(
                "!has(self.learning) || self.model.source.format != 'hf' || !has(self.learning.trained)"
                " || !has(self.learning.trained.kind) || self.learning.trained.kind == 'lora'",
                _LM_LEARNING_LORA,
                field_path=".learning.trained.kind",
            ),
            cel(
                "!has(self.learning) || self.model.source.format != 'hf'"
                " || self.model.source.uri.startsWith('file://') || self.model.source.uri.startsWith('pvc://')",
                _LM_LEARNING_LOCAL,
                field_path=".model.source.uri",
            ),
            cel(
                "!has(self.learning) || !has(self.edge) || !has(self.edge.adapters)"
                " || !self.edge.adapters.exists(a, a.name == (has(self.learning.adapterName)"
                " ? self.learning.adapterName : 'learned'))",
                _LEARNED_NAME_TAKEN,
                field_path=".learning.adapterName",
            ),
            cel(
                f"!has(self.edge) || !has(self.edge.collaboration) || {_IS_LM}",
                _COLLAB_NEEDS_LM,
                field_path=".edge.collaboration",
            ),
            cel(
                "!has(self.edge) || !has(self.edge.collaboration) || !has(self.edge.collaboration.mode)"
                " || self.edge.collaboration.mode == 'edge-only'"
                " || (!has(self.cloud) || !has(self.cloud.replicas) || self.cloud.replicas > 0)"
                " && (!has(self.edge.fallback) || !has(self.edge.fallback.enabled) || self.edge.fallback.enabled)",
                _COLLAB_NEEDS_CLOUD,
                field_path=".edge.collaboration.mode",
            ),
        )
    )

    model: ModelSpec
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    cloud: CloudSpec = Field(default_factory=CloudSpec)
    edge: EdgeSpec = Field(default_factory=EdgeSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    learning: LearningSpec | None = None
    """Federated fine-tuning at the edge; see docs/learning.md."""

    def _learning_fits_the_model(self, learning: LearningSpec) -> None:
        lm = self.model.source.format in LM_FORMATS
        if learning.trainable is None and self.model.source.format != "hf":
            raise ValueError(_LEARNING_NEEDS_TRAINABLE)
        if learning.trainable is not None and lm:
            raise ValueError(_LM_LEARNING_NO_TRAINABLE)
        if self.model.source.format == "hf":
            if learning.trained.kind != "lora":
                raise ValueError(_LM_LEARNING_LORA)
            if not self.model.source.uri.startswith(("file://", "pvc://")):
                raise ValueError(_LM_LEARNING_LOCAL)
        if any(a.name == learning.adapter_name for a in self.edge.adapters):
            raise ValueError(_LEARNED_NAME_TAKEN)

    @model_validator(mode="after")
    def _calibration_data(self) -> ModelDeploymentSpec:
        if any(v.method == "int8-static" for v in self.edge.variants) and self.model.eval_data_uri is None:
            raise ValueError(
                "model.evalDataUri is required when a variant uses method int8-static (it calibrates on real inputs)"
            )
        if self.learning is not None and self.model.eval_data_uri is None:
            raise ValueError(
                "model.evalDataUri is required with learning (learned weights are exported and checked on it)"
            )
        if self.cloud.runtime.engine == "vllm":
            if self.model.source.format != "hf":
                raise ValueError(VLLM_NEEDS_HF)
            if self.cloud.resources.gpu < 1:
                raise ValueError(VLLM_NEEDS_GPU)
        if self.cloud.runtime.device == "cuda":
            if self.cloud.runtime.engine != "kiri" or self.model.source.format not in LM_FORMATS:
                raise ValueError(CUDA_NEEDS_KIRI_LM)
            if self.cloud.resources.gpu < 1:
                raise ValueError(CUDA_NEEDS_GPU)
        collaboration = self.edge.collaboration
        if collaboration is not None:
            if self.model.source.format not in LM_FORMATS:
                raise ValueError(_COLLAB_NEEDS_LM)
            if collaboration.mode in CLOUD_MODES and (
                self.cloud.replicas == 0 or not self.edge.fallback.enabled
            ):
                raise ValueError(_COLLAB_NEEDS_CLOUD)
        if self.learning is not None:
            self._learning_fits_the_model(self.learning)
        variants = self.edge.variants
        if self.edge.adapters and self.model.source.format not in LM_FORMATS:
            raise ValueError(_ADAPTERS_NEED_LM)
        if self.model.source.format not in LM_FORMATS:
            if any(v.method in LM_METHODS or any(g.metric in LM_METRICS for g in v.gate) for v in variants):
                raise ValueError(_NEEDS_LM)
            return self
        if any(v.method in TENSOR_METHODS for v in variants):
            raise ValueError(_NEEDS_TENSOR_METHOD)
        if any(
            not is_default_gate(v.gate) and any(g.metric in TENSOR_METRICS for g in v.gate) for v in variants
        ):
            raise ValueError(_NEEDS_LM_METRIC)
        if variants and self.model.eval_data_uri is None:
            raise ValueError(_NEEDS_LM_EVAL)
        return self
