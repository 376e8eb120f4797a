"""The cloud tier of a language model for real: `kiri compress --format hf` publishes the full model's
onnxruntime-genai pack into the artifact store, the planner renders the cloud Deployment from the manifest, and
a `kiri serve` started with exactly the args it rendered (only the address and cache directory replaced) fetches
the pack, checks its sha256 and answers a chat completion with the full model's greedy text."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.observations import Observed
from kiri_operator.planning import Settings, plan
from kiri_operator.planning import building as B
from kiri_operator.planning.revisions import compression_key
from kiri_runtime import manifests
from kiri_runtime.compressing import cli as compress_cli
from planning_worlds import manifest_configmap, observed

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "tiny-chat"
LOCAL_FLAGS = ["--host", "", "--port", "", "--cache-dir", ""]
"""The flags `serving` sets to this machine's address and cache (their rendered values are the pod's)."""
QUESTION = [{"role": "user", "content": "What does def dedent do?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lm_spec(checkpoint: Path, sha: str, eval_data: Path, store: Path) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": MODEL,
                "version": "1",
                "source": {"uri": checkpoint.as_uri(), "format": "hf", "sha256": sha},
                "evalDataUri": eval_data.as_uri(),
            },
            "cloud": {"replicas": 1},
            "edge": {"variants": [{"name": "q4", "method": "int4"}], "artifacts": {"uri": store.as_uri()}},
        }
    )


def settings(s: ModelDeploymentSpec) -> Settings:
    """This machine's temporary store is the admin's allowed host store."""
    return Settings(host_store_roots=(urlparse(B.store_uri(s)).path,))


def world(*children: Any) -> Observed:
    return observed(children={(c.kind, c.name): c for c in children})


@pytest.fixture(scope="module")
def published(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ModelDeploymentSpec, manifests.Manifest]:
    """The compression Job's compress step, run here with the args the operator rendered for it."""
    from kiri_runtime.compressing.lm.sources import directory_sha256

    root = tmp_path_factory.mktemp("lm-cloud")
    eval_data = root / "eval.jsonl"
    eval_data.write_text('{"messages": [{"role": "user", "content": "What does class Template do?"}]}\n')
    store = root / "store"
    s = lm_spec(tiny_llama_dir, directory_sha256(tiny_llama_dir), eval_data, store)
    (job,) = [a.body for a in plan(s, world(), settings(s)).actions if a.kind == "Job" and a.body is not None]
    (step,) = job["spec"]["template"]["spec"]["initContainers"]
    rendered: list[str] = step["args"]
    out = Path(rendered[rendered.index("--out") + 1])
    assert out == store / "ns" / "md" / compression_key(s, store.as_uri())  # the Job's hostPath store
    parser = argparse.ArgumentParser(prog="kiri")
    compress_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([*rendered, "--decode-tokens", "8"])
    assert args.handler(args) == 0
    return s, manifests.load(out)


@contextlib.contextmanager
def started(args: list[str], cache: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`kiri serve` with the rendered args, only the address and cache directory replaced; (its URL, the process)."""
    port = free_port()
    local = {"--host": "127.0.0.1", "--port": str(port), "--cache-dir": str(cache)}
    argv = [local.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "kiri_operator.cli", *argv, "--threads", "1"], env=env)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def serving(args: list[str], cache: Path) -> Iterator[str]:
    with started(args, cache) as (url, proc):
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"kiri serve exited with {proc.returncode}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "kiri serve did not become ready"
            time.sleep(0.5)
        yield url


def greedy_chat(url: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_the_rendered_cloud_deployment_serves_the_published_pack_and_answers_a_chat_completion(
    published: tuple[ModelDeploymentSpec, manifests.Manifest], tmp_path: Path
) -> None:
    s, m = published
    assert (m.model.kind, m.model.uri) == ("causal-lm", "model.tar")
    assert [v.name for v in m.variants] == ["q4"]  # the pack is the cloud's, not an edge variant
    p = plan(s, world(manifest_configmap(s, m)), settings(s))
    (deployment,) = [a.body for a in p.actions if a.kind == "Deployment" and a.body is not None]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args: list[str] = container["args"]
    assert args[args.index("--sha256") + 1] == m.model.onnx_sha256
    uri = args[args.index("--model-uri") + 1]
    assert uri.endswith(f"/{compression_key(s, B.store_uri(s))}/model.tar") and uri.startswith("file://")
    with serving(args, tmp_path / "cache") as url:
        answer = greedy_chat(url, 8)
        assert answer["model"] == MODEL
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["finish_reason"] == "length"
        text = answer["choices"][0]["message"]["content"]
        # The full model: the same greedy text as the fp32 build every other language-model test serves.
        reference = ["serve", "--model-uri", str(_tiny_genai()), "--name", MODEL, *LOCAL_FLAGS]
        with serving(reference, tmp_path / "cache-ref") as ref:
            assert text == greedy_chat(ref, 8)["choices"][0]["message"]["content"]


def _tiny_genai() -> Path:
    from lm_fixture import tiny_genai

    return tiny_genai()


# --- the GPU pack (cloud.runtime.device: cuda) -------------------------------------------------------------


def gpu_spec(base: ModelDeploymentSpec) -> ModelDeploymentSpec:
    body = base.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["cloud"] = {"replicas": 1, "resources": {"gpu": 1}, "runtime": {"device": "cuda"}}
    return ModelDeploymentSpec.model_validate(body)


@pytest.fixture(scope="module")
def published_gpu(
    published: tuple[ModelDeploymentSpec, manifests.Manifest],
) -> tuple[ModelDeploymentSpec, manifests.Manifest, Path]:
    """The compression Job of the same model with `cloud.runtime.device: cuda`, its compress step run here."""
    s = gpu_spec(published[0])
    (job,) = [a.body for a in plan(s, world(), settings(s)).actions if a.kind == "Job" and a.body is not None]
    (step,) = job["spec"]["template"]["spec"]["initContainers"]
    rendered: list[str] = step["args"]
    assert rendered[rendered.index("--gpu-pack") + 1] == "fp16"
    out = Path(rendered[rendered.index("--out") + 1])
    parser = argparse.ArgumentParser(prog="kiri")
    compress_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([*rendered, "--decode-tokens", "8"])
    assert args.handler(args) == 0
    return s, manifests.load(out), out


def test_a_cuda_cloud_is_compressed_under_its_own_key_and_publishes_an_fp16_pack_carrying_the_fp32_weights(
    published: tuple[ModelDeploymentSpec, manifests.Manifest],
    published_gpu: tuple[ModelDeploymentSpec, manifests.Manifest, Path],
) -> None:
    import hashlib

    s, m, out = published_gpu
    assert compression_key(s, B.store_uri(s)) != compression_key(published[0], B.store_uri(published[0]))
    gpu = m.model.gpu_pack
    assert gpu is not None and published[1].model.gpu_pack is None
    assert (gpu.uri, gpu.precision, gpu.execution_provider) == ("model-fp16-cuda.tar", "fp16", "cuda")
    tar = out / gpu.uri
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == gpu.sha256 and tar.stat().st_size == gpu.size_bytes
    # fp16 rounding of weights of magnitude < 1: more than nothing, less than 2^-11 of the largest.
    assert 0 < gpu.max_abs_weight_error < 1e-3
    assert gpu.size_bytes < m.model.size_bytes  # half the bytes per weight
    assert m.model.onnx_sha256 == published[1].model.onnx_sha256  # the fp32 pack is still built and checked


def test_the_rendered_cuda_cloud_serves_the_gpu_pack_and_says_why_it_cannot_on_a_machine_without_a_gpu(
    published_gpu: tuple[ModelDeploymentSpec, manifests.Manifest, Path], tmp_path: Path
) -> None:
    s, m, _ = published_gpu
    assert m.model.gpu_pack is not None
    p = plan(s, world(manifest_configmap(s, m)), settings(s))
    (deployment,) = [a.body for a in p.actions if a.kind == "Deployment" and a.body is not None]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args: list[str] = container["args"]
    assert container["image"] == s.runtime.cuda_image
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert args[args.index("--device") + 1] == "cuda"
    assert args[args.index("--sha256") + 1] == m.model.gpu_pack.sha256
    assert args[args.index("--model-uri") + 1].endswith("/model-fp16-cuda.tar")
    # This machine's onnxruntime-genai is the CPU build: the server stays up, not ready, and says why.
    reason = _not_ready_reason(args, tmp_path / "cache")
    assert "--device cuda: this onnxruntime-genai has no usable CUDA provider" in reason
    # The GPU pack on CPU is refused before its first token could fail.
    cpu = [a for a in args if a not in ("--device", "cuda")]
    reason = _not_ready_reason(cpu, tmp_path / "cache-cpu")
    assert "was built for CUDA (the fp16 GPU pack), which decodes on a GPU only" in reason


def _not_ready_reason(args: list[str], cache: Path) -> str:
    """The readiness probe's reason once the load has failed (the server stays live meanwhile)."""
    with started(args, cache) as (url, proc):
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"kiri serve exited with {proc.returncode}"
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{url}/v2/health/ready", timeout=2)
                assert r.status_code != 200, "a CUDA pack became ready on CPU"
                reason = str(r.json().get("reason", ""))
                if "not loaded:" in reason:
                    assert httpx.get(f"{url}/v2/health/live", timeout=2).status_code == 200
                    return reason
            assert time.monotonic() < deadline, "kiri serve never said why it is not ready"
            time.sleep(0.5)
