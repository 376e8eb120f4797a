"""`make demo`'s generative act without real nodes (hack/demo_lm.py): the operator's edge and cloud pods run as host
processes with the `kiri serve` args the operator rendered, only the address, cache, threads and the cloud's address
replaced."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.planning import building as B
from planning_worlds import SHA

SCRIPT = Path(__file__).resolve().parents[3] / "hack" / "demo_lm.py"


@pytest.fixture(scope="module")
def demo_lm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kiri_hack_demo_lm_host", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def chat_spec() -> ModelDeploymentSpec:
    """What hack/demo.sh applies for the chat model (kwok nodes: no placement fields)."""
    return ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "chat",
                "version": "1.0.0",
                "source": {"uri": "file:///demo/lm/source.tar", "format": "hf", "sha256": SHA},
                "evalDataUri": "file:///demo/lm/eval.jsonl",
            },
            "cloud": {
                "replicas": 1,
                "resources": {"cpu": "500m", "memory": "1Gi", "gpu": 0},
                "runtime": {"threads": 1},
            },
            "edge": {
                "artifacts": {"uri": "file:///demo/store"},
                "variants": [{"name": "int4", "method": "int4"}],
                "collaboration": {"mode": "cascade", "cascade": {"threshold": 0.95}},
            },
        }
    )


OWNER = B.Owner("chat", "kiri-demo", "uid-1")


def test_the_edge_process_keeps_the_operators_model_and_collaboration_flags_and_calls_the_cloud_process(
    demo_lm: ModuleType,
) -> None:
    artifact = B.EdgeArtifact("file:///demo/store/kiri-demo/chat/k1/int4.tar", SHA)
    ds = B.edge_daemonset(chat_spec(), OWNER, "rev1", "k1", "int4", artifact, ["n1"], {})
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    args = demo_lm.host_serve_args(container["args"], 41234, "/demo/cache-lm-edge", "http://127.0.0.1:41000")
    assert args == [
        "serve", "--model-uri", "file:///demo/store/kiri-demo/chat/k1/int4.tar", "--name", "chat", "--sha256", SHA,
        "--model-version", "1.0.0", "--variant", "int4", "--host", "127.0.0.1", "--port", "41234",
        "--cache-dir", "/demo/cache-lm-edge", "--revisions-kept", "2",
        "--fallback-url", "http://127.0.0.1:41000", "--queue-limit", "32",
        "--collaboration", "cascade", "--cloud-model", "chat", "--cascade-metric", "margin",
        "--cascade-threshold", "0.95", "--cascade-window", "1", "--cascade-cloud-tokens", "0",
        "--cascade-check", "full",
        "--threads", "1",
    ]  # fmt: skip


def test_the_cloud_process_serves_the_operators_pack_with_its_own_address_and_cache(
    demo_lm: ModuleType,
) -> None:
    pack = B.CloudPack("file:///demo/store/kiri-demo/chat/k1/model.tar", SHA)
    deployment = B.cloud_deployment(chat_spec(), OWNER, {}, pack)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}  # no GPU: kiri serve is CPU
    args = demo_lm.host_serve_args(container["args"], 41000, "/demo/cache-lm-cloud")
    assert args == [
        "serve", "--model-uri", "file:///demo/store/kiri-demo/chat/k1/model.tar", "--name", "chat", "--sha256", SHA,
        "--model-version", "1.0.0", "--variant", "full", "--host", "127.0.0.1", "--port", "41000",
        "--cache-dir", "/demo/cache-lm-cloud", "--threads", "1",
    ]  # fmt: skip


def test_an_edge_without_a_cloud_tier_is_refused_rather_than_run_alone(demo_lm: ModuleType) -> None:
    with pytest.raises(
        ValueError, match="no --fallback-url in serve --name chat: the edge has no cloud tier"
    ):
        demo_lm.host_serve_args(["serve", "--name", "chat"], 1, "/c", "http://127.0.0.1:2")
