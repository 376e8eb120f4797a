"""The cloud tier's serving engine: `kiri serve` (the default) or, opt-in for language models on GPU clouds,
vLLM's OpenAI server.

Data only; the Deployment is `planning.building.vllm_deployment`. An edge in a collaboration mode reaches
either engine the same way, through the cloud Service and OpenAI completions on token ids
(docs/operations.md "A vLLM cloud tier").
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kiri_operator.api.bases import ApiModel

CloudEngine = Literal["kiri", "vllm"]
VllmDtype = Literal["float16", "bfloat16", "float32", "auto"]
# A released tag, not `latest`: an engine upgrade is a spec change (a new cloud Deployment), never a surprise.
DEFAULT_VLLM_IMAGE = "docker.io/vllm/vllm-openai:v0.11.0"
VLLM_ONLY_WITH_ENGINE = "cloud.runtime.vllm applies only to cloud.runtime.engine vllm"
VLLM_NO_KIRI_SETTINGS = (
    "cloud.runtime.threads and cloud.runtime.batching are kiri serve's; vLLM batches continuously on its own: "
    "remove them with cloud.runtime.engine vllm"
)
VLLM_NEEDS_HF = (
    "cloud.runtime.engine vllm serves a Hugging Face checkpoint: model.source.format must be hf "
    "(a tensor model or a GGUF is served by kiri serve)"
)
VLLM_NEEDS_GPU = "cloud.runtime.engine vllm needs cloud.resources.gpu of at least 1 (the vllm-openai image runs on CUDA GPUs)"
CloudDevice = Literal["cpu", "cuda"]
CUDA_NEEDS_GPU = (
    "cloud.runtime.device cuda needs cloud.resources.gpu of at least 1 (it decodes on the node's GPU)"
)
CUDA_NEEDS_KIRI_LM = (
    "cloud.runtime.device cuda applies to a language model (model.source.format hf or gguf) served by engine kiri "
    "(vLLM runs on the GPU by itself)"
)
MAX_EXTRA_ARGS = 32


class VllmSpec(ApiModel):
    """vLLM's OpenAI server (`python3 -m vllm.entrypoints.openai.api_server`) as the cloud tier. An init
    container (the Kiri runtime image, `kiri checkpoint`) fetches the `hf` source, checks its sha256 and
    unpacks it; vLLM serves that directory under `model.name` with one tensor-parallel rank per GPU."""

    image: Annotated[str, Field(min_length=1, max_length=512)] = DEFAULT_VLLM_IMAGE
    """vLLM OpenAI server image. The verify call of `speculative` needs a vLLM that answers
    `return_tokens_as_token_ids` per request (0.6.4 and later)."""
    dtype: VllmDtype = "float16"
    """Weights and activations (`--dtype`): `float16` by default, as the full model is served on GPUs."""
    max_model_len: Annotated[int, Field(ge=16, le=1048576)] | None = None
    """Context length (`--max-model-len`); unset: the checkpoint's."""
    gpu_memory_utilization: Annotated[float, Field(ge=0.05, le=0.99)] = 0.9
    """Share of each GPU's memory vLLM may take for weights and KV cache (`--gpu-memory-utilization`)."""
    max_num_seqs: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Sequences decoded at once (`--max-num-seqs`); unset: vLLM's default."""
    max_logprobs: Annotated[int, Field(ge=1, le=1024)] = 20
    """Largest `logprobs` a request may ask (`--max-logprobs`). A sampled `speculative` verify asks 20 (the edge's
    top list); keep at least that."""
    extra_args: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=MAX_EXTRA_ARGS)] = []
    """Further flags of vLLM's OpenAI server, appended as given (e.g. `--enable-prefix-caching`). The flags Kiri sets
    (model, name, host, port, dtype, parallelism) come first; a repeated flag's last value is argparse's."""
