"""Dataplane, micro-batcher and cascade logic with an in-memory model (numpy, no ONNX file)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from kiri_runtime.batching import MicroBatcher
from kiri_runtime.dataplane import BatchingConfig, DataPlane, TensorSpec, has_dynamic_batch
from kiri_runtime.errors import (
    BadRequest,
    InjectedFault,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    UpstreamError,
)
from kiri_runtime.fallback import Cascade, low_confidence, top1_confidence
from kiri_runtime.tensors import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

pytestmark = pytest.mark.timeout(20)


class Doubler:
    """y = 2x and s = row sums; records the batch sizes it ran."""

    platform = "numpy"

    def __init__(self, delay: float = 0.0) -> None:
        self.inputs = [TensorSpec("x", "FP32", (-1, 3))]
        self.outputs = [TensorSpec("y", "FP32", (-1, 3)), TensorSpec("s", "FP32", (-1,))]
        self.batches: list[int] = []
        self.delay = delay

    def predict(self, feeds):
        x = feeds["x"]
        self.batches.append(x.shape[0])
        if self.delay:
            time.sleep(self.delay)
        return {"y": x * 2, "s": x.sum(axis=1)}


def request(rows: int = 1, value: float = 1.0, **kw) -> InferenceRequest:
    x = np.full((rows, 3), value, dtype=np.float32)
    return InferenceRequest([Tensor("x", "FP32", x.shape, x)], **kw)


async def test_registered_model_is_not_ready_until_loaded():
    dp = DataPlane()
    dp.register("m", "2", "int8", "ab" * 32)
    assert not dp.ready() and not dp.model_ready("m")
    assert dp.model_metadata("m")["parameters"]["ready"] is False
    with pytest.raises(ModelNotReady):
        await dp.infer("m", request())
    dp.load("m", Doubler())
    assert dp.ready() and dp.model_ready("m", "2")
    with pytest.raises(ModelNotFound, match="no version '3'"):
        dp.model_ready("m", "3")
    with pytest.raises(ModelNotFound):
        await dp.infer("other", request())
    dp.draining = True
    assert not dp.ready()
    await dp.close()


async def test_infer_validates_against_the_model_signature():
    dp = DataPlane()
    dp.load("m", Doubler())
    out = await dp.infer("m", request(2, 1.5, id="r"))
    assert out.id == "r" and [t.name for t in out.outputs] == ["y", "s"]
    assert out.outputs[0].data.tolist() == [[3.0] * 3] * 2 and out.outputs[1].shape == (2,)
    only_s = await dp.infer("m", request(outputs=[RequestedOutput("s")]))
    assert [t.name for t in only_s.outputs] == ["s"]
    bad = [
        (InferenceRequest([Tensor("z", "FP32", (1, 3), np.zeros((1, 3), np.float32))]), "unexpected input"),
        (InferenceRequest([]), "missing inputs"),
        (InferenceRequest([Tensor("x", "FP64", (1, 3), np.zeros((1, 3)))]), "expects FP32"),
        (InferenceRequest([Tensor("x", "FP32", (1, 4), np.zeros((1, 4), np.float32))]), "does not match"),
        (InferenceRequest([Tensor("x", "FP32", (3,), np.zeros(3, np.float32))]), "does not match"),
        (request(outputs=[RequestedOutput("q")]), "unknown outputs"),
    ]
    for req, message in bad:
        with pytest.raises(BadRequest, match=message):
            await dp.infer("m", req)
    await dp.close()


async def test_queue_limit_and_queue_depth_gauge():
    dp = DataPlane(queue_limit=2)
    dp.load("m", Doubler(delay=0.2))
    first = [asyncio.create_task(dp.infer("m", request())) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert dp.metrics.registry.get_sample_value("kiri_queue_depth", {"model": "m"}) == 2
    with pytest.raises(Overloaded, match="limit 2"):
        await dp.infer("m", request())
    await asyncio.gather(*first)
    assert dp.metrics.registry.get_sample_value("kiri_queue_depth", {"model": "m"}) == 0
    await dp.close()


async def test_fail_ratio_is_seeded():
    async def outcomes(seed: int) -> list[bool]:
        dp = DataPlane(fail_ratio=0.3, fail_seed=seed)
        dp.load("m", Doubler())
        results = []
        for _ in range(50):
            try:
                await dp.infer("m", request())
                results.append(True)
            except InjectedFault:
                results.append(False)
        await dp.close()
        return results

    a, b = await outcomes(1), await outcomes(1)
    assert a == b and 5 <= a.count(False) <= 25


async def test_batching_only_for_dynamic_batch_models():
    fixed = Doubler()
    fixed.inputs = [TensorSpec("x", "FP32", (1, 3))]
    assert has_dynamic_batch(Doubler()) and not has_dynamic_batch(fixed)
    dp = DataPlane(batching=BatchingConfig(True, 8, 5))
    dp.load("dyn", Doubler())
    dp.load("fixed", fixed)
    assert dp._entry("dyn").batcher is not None and dp._entry("fixed").batcher is None
    await dp.close()


async def test_micro_batcher_merges_splits_and_isolates_signatures():
    model = Doubler(delay=0.05)
    dp = DataPlane(batching=BatchingConfig(True, max_batch_size=6, max_wait_ms=30))
    dp.load("m", model)
    reqs = [request(rows=1 + i % 3, value=float(i)) for i in range(12)]
    outs = await asyncio.gather(*(dp.infer("m", r) for r in reqs))
    for r, out in zip(reqs, outs, strict=True):
        assert out.outputs[0].data.tolist() == (r.inputs[0].data * 2).tolist()
    assert sum(model.batches) == sum(r.inputs[0].data.shape[0] for r in reqs)
    assert max(model.batches) <= 6 and len(model.batches) < len(reqs)
    await dp.close()


async def test_lone_request_does_not_wait_for_a_batch():
    ran: list[int] = []

    def run(feeds):
        ran.append(len(feeds["x"]))
        return {"y": feeds["x"]}

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(run, pool, max_batch_size=8, max_wait_s=2.0)
        start = time.monotonic()
        await batcher.submit({"x": np.zeros((1, 2), np.float32)})
        assert time.monotonic() - start < 1.0  # the 2 s max wait applies only when arrivals are dense
        # Different trailing shapes never share a run.
        a = asyncio.create_task(batcher.submit({"x": np.zeros((1, 2), np.float32)}))
        b = asyncio.create_task(batcher.submit({"x": np.zeros((1, 5), np.float32)}))
        ya, yb = await asyncio.gather(a, b)
        assert ya["y"].shape == (1, 2) and yb["y"].shape == (1, 5)
        await batcher.close()


async def test_micro_batcher_propagates_errors_to_every_caller():
    from concurrent.futures import ThreadPoolExecutor

    def boom(feeds):
        raise RuntimeError("kernel failed")

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(boom, pool, max_batch_size=4, max_wait_s=0.01)
        results = await asyncio.gather(
            *(batcher.submit({"x": np.zeros((1, 1), np.float32)}) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        await batcher.close()


def test_top1_confidence_reads_probabilities_and_logits():
    probs = np.array([[0.7, 0.2, 0.1], [0.34, 0.33, 0.33]])
    np.testing.assert_allclose(top1_confidence(probs), [0.7, 0.34])
    logits = np.array([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(top1_confidence(logits), [0.99991, 1 / 3], rtol=1e-4)

    def resp(array: np.ndarray) -> InferenceResponse:
        return InferenceResponse("m", [Tensor("o", "FP32", array.shape, array)])

    assert low_confidence(resp(probs.astype(np.float32)), 0.5)
    assert not low_confidence(resp(probs[:1].astype(np.float32)), 0.5)
    assert not low_confidence(resp(np.zeros((2, 2, 2), np.float32)), 0.5)  # not a classifier output
    assert not low_confidence(resp(np.array([[1, 2]], dtype=np.int64)), 0.5)


class FakeCloud:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[str] = []

    async def infer(self, name: str, req: InferenceRequest) -> InferenceResponse:
        self.calls.append(name)
        if self.fail:
            raise UpstreamError("cloud runtime answered 500")
        y = np.ones((1, 3), np.float32)
        return InferenceResponse(
            name, [Tensor("y", "FP32", (1, 3), y)], "9", parameters={"kiri_tier": "edge"}
        )

    async def close(self) -> None:
        pass


async def test_cascade_routes_and_labels():
    dp = DataPlane(queue_limit=1)
    dp.register("m")
    cloud = FakeCloud()
    cascade = Cascade(dp, cloud, confidence_threshold=0.9)  # type: ignore[arg-type]
    out = await cascade.infer("m", request(id="a"))
    assert out.parameters == {"kiri_tier": "cloud", "kiri_fallback_reason": "not_ready"} and out.id == "a"
    model = Doubler(delay=0.2)
    model.outputs = [TensorSpec("y", "FP32", (-1, 3))]
    dp.load("m", model)
    busy = asyncio.create_task(cascade.infer("m", request(value=0.0)))
    await asyncio.sleep(0.05)
    over = await cascade.infer("m", request())
    assert over.parameters["kiri_fallback_reason"] == "overloaded"
    local = await busy  # y = 0 everywhere: uniform, below 0.9 confidence
    assert local.parameters == {"kiri_tier": "cloud", "kiri_fallback_reason": "low_confidence"}
    assert cloud.calls == ["m", "m", "m"]
    peaked = np.array([[5.0, 0.0, 0.0]], dtype=np.float32)  # y = [10, 0, 0] read as logits: top-1 ~ 0.9999
    confident = await cascade.infer("m", InferenceRequest([Tensor("x", "FP32", (1, 3), peaked)]))
    assert confident.parameters == {"kiri_tier": "edge"}
    no_cloud = Cascade(dp)
    assert (await no_cloud.infer("m", request(value=0.0))).parameters == {"kiri_tier": "edge"}
    await dp.close()


async def test_cascade_cloud_failure():
    dp = DataPlane()
    dp.register("m")
    cascade = Cascade(dp, FakeCloud(fail=True), 0.9)  # type: ignore[arg-type]
    with pytest.raises(UpstreamError, match="not_ready"):
        await cascade.infer("m", request())
    model = Doubler()
    model.outputs = [TensorSpec("y", "FP32", (-1, 3))]
    dp.load("m", model)
    out = await cascade.infer("m", request(value=0.0))
    assert (
        out.parameters["kiri_tier"] == "edge" and out.parameters["kiri_fallback_reason"] == "low_confidence"
    )
    assert (
        dp.metrics.registry.get_sample_value(
            "kiri_fallback_failures_total", {"model": "m", "reason": "low_confidence"}
        )
        == 1
    )
    await dp.close()
