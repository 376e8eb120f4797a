"""The transport-free core of the server: model registry, readiness, metadata and inference (OIP v2).

In the spirit of MLServer's `handlers/dataplane.py`: HTTP (`rest`) and any later gRPC adapter call the
same methods and only translate errors (`kiri_runtime.errors`) into their status codes.

A model is *registered* before it is *loaded*: the server answers `/v2/models/{name}/ready` with
false (not 404) while the artifact is still being fetched and verified, so readiness stays false until
the verified model is loaded, and the cloud fallback can answer in the meantime.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiri_runtime import __version__
from kiri_runtime.batching import Feeds, MicroBatcher
from kiri_runtime.errors import BadRequest, InjectedFault, ModelNotFound, ModelNotReady, Overloaded
from kiri_runtime.metrics import RuntimeMetrics
from kiri_runtime.tensors import ORT_DATATYPES, InferenceRequest, InferenceResponse, Tensor, datatype_of

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "kiri_fallback", "kiri_micro_batching"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a dynamic dimension

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Model(Protocol):
    """What the dataplane needs from a loaded model. `predict` is blocking and thread-safe."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    platform: str

    def predict(self, feeds: Feeds) -> Feeds: ...


class OnnxModel:
    platform = "onnxruntime_onnx"

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=ort.get_available_providers())
        self.inputs = [self._spec(a) for a in self.session.get_inputs()]
        self.outputs = [self._spec(a) for a in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        return TensorSpec(arg.name, ORT_DATATYPES.get(arg.type, arg.type), shape)

    def predict(self, feeds: Feeds) -> Feeds:
        results = self.session.run(self._output_names, feeds)
        return dict(zip(self._output_names, results, strict=True))


def run_slots(threads_per_run: int | None = None) -> int:
    """Concurrent `session.run` calls that keep the cores busy without oversubscribing them.

    ONNX Runtime uses all cores per run when its thread count is unset, so then one run at a time is
    best; with N threads per run, cores // N runs. More slots than that only adds cache thrash.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // threads_per_run) if threads_per_run else 1


def has_dynamic_batch(model: Model) -> bool:
    specs = [*model.inputs, *model.outputs]
    return bool(specs) and all(len(s.shape) >= 1 and s.shape[0] == -1 for s in specs)


@dataclass
class BatchingConfig:
    enabled: bool = False
    max_batch_size: int = 32
    max_wait_ms: float = 2.0


@dataclass
class ModelEntry:
    name: str
    version: str
    variant: str = ""
    sha256: str = ""
    model: Model | None = None
    batcher: MicroBatcher | None = None
    in_flight: int = 0
    info: dict[str, str] = field(default_factory=dict)
    # Mean run time; starts high so the first runs go to the thread pool until we know the model is fast.
    run_s: float = 1.0

    @property
    def ready(self) -> bool:
        return self.model is not None


class DataPlane:
    def __init__(
        self,
        metrics: RuntimeMetrics | None = None,
        *,
        queue_limit: int = 0,
        fail_ratio: float = 0.0,
        fail_seed: int = 0,
        delay_ms: float = 0.0,
        batching: BatchingConfig | None = None,
        workers: int | None = None,
        inline_below_ms: float = 0.2,
    ) -> None:
        self.metrics = metrics if metrics is not None else RuntimeMetrics()
        self.queue_limit = queue_limit
        self.fail_ratio = fail_ratio
        self.delay_s = delay_ms / 1000.0
        self.inline_below_s = inline_below_ms / 1000.0
        self._rng = random.Random(fail_seed)
        self.batching = batching or BatchingConfig()
        self.workers = workers or run_slots()
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kiri-infer")
        self._models: dict[str, ModelEntry] = {}
        self.draining = False
        self.load_error = ""
        """Why the last load attempt failed (set by the loader); readiness probes show it."""

    # ------------------------------------------------------------ registry

    def register(self, name: str, version: str = "1", variant: str = "", sha256: str = "") -> ModelEntry:
        entry = ModelEntry(name, version, variant, sha256)
        self._models[name] = entry
        self.metrics.model_ready.labels(name).set(0)
        return entry

    def load(self, name: str, model: Model, sha256: str | None = None) -> None:
        entry = self._models.get(name) or self.register(name)
        if sha256:
            entry.sha256 = sha256
        if self.batching.enabled:
            if has_dynamic_batch(model):
                entry.batcher = MicroBatcher(
                    lambda feeds: self._run(entry, model, feeds),
                    self.executor,
                    max_batch_size=self.batching.max_batch_size,
                    max_wait_s=self.batching.max_wait_ms / 1000.0,
                    concurrency=self.workers,
                    on_batch=self.metrics.batch_size.labels(name).observe,
                )
            else:
                log.warning("model %s has no dynamic batch dimension: micro-batching is off for it", name)
        entry.model = model
        if entry.info:
            self.metrics.model_info.remove(*entry.info.values())
        entry.info = {
            "model": name,
            "version": entry.version,
            "variant": entry.variant,
            "sha256": entry.sha256,
        }
        self.metrics.model_info.labels(*entry.info.values()).set(1)
        self.metrics.model_ready.labels(name).set(1)
        log.info("model %s version %s (%s) is ready", name, entry.version, entry.sha256[:12] or "no sha256")

    async def unload(self, name: str) -> None:
        entry = self._entry(name)
        batcher, entry.model, entry.batcher = entry.batcher, None, None
        self.metrics.model_ready.labels(name).set(0)
        if batcher is not None:
            await batcher.close()

    async def close(self) -> None:
        for name in list(self._models):
            await self.unload(name)
        self.executor.shutdown(wait=True)

    def _entry(self, name: str, version: str | None = None) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not served here")
        if version is not None and version != entry.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r} (serving {entry.version!r})")
        return entry

    def has_model(self, name: str) -> bool:
        return name in self._models

    # ------------------------------------------------------------ health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and bool(self._models) and all(e.ready for e in self._models.values())

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return not self.draining and self._entry(name, version).ready

    def not_ready_reason(self) -> str:
        """Why `ready()` is false, in words for a probe's body and a log line ("" when ready)."""
        if self.draining:
            return "draining: shutting down"
        waiting = sorted(n for n, e in self._models.items() if not e.ready)
        if not self._models:
            return "no model registered"
        if not waiting:
            return ""
        return self.load_error or f"model {', '.join(waiting)} not loaded yet"

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "kiri", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        entry = self._entry(name, version)
        meta: dict[str, Any] = {"name": name, "versions": [entry.version], "platform": ""}
        if entry.model is not None:
            meta["platform"] = entry.model.platform
            meta["inputs"] = [s.metadata() for s in entry.model.inputs]
            meta["outputs"] = [s.metadata() for s in entry.model.outputs]
        meta["parameters"] = {
            "kiri_variant": entry.variant,
            "kiri_sha256": entry.sha256,
            "ready": entry.ready,
        }
        return meta

    # ------------------------------------------------------------ inference

    def check_admission(self, name: str, version: str | None = None) -> ModelEntry:
        """Raises ModelNotReady / Overloaded before any work, so the fallback can take the request."""
        entry = self._entry(name, version)
        if entry.model is None:
            raise ModelNotReady(f"model {name!r} is not loaded yet")
        if self.queue_limit and entry.in_flight >= self.queue_limit:
            raise Overloaded(
                f"model {name!r} has {entry.in_flight} requests queued (limit {self.queue_limit})"
            )
        return entry

    async def infer(
        self, name: str, request: InferenceRequest, version: str | None = None
    ) -> InferenceResponse:
        entry = self.check_admission(name, version)
        model = entry.model
        assert model is not None
        if getattr(model, "generative", False):
            raise BadRequest(
                f"model {name!r} is a language model: use /v2/models/{name}/generate or /v1/chat/completions"
            )
        if self.fail_ratio and self._rng.random() < self.fail_ratio:
            raise InjectedFault("injected failure (--fail-ratio)")
        feeds = self._feeds(model, request)
        wanted = self._wanted_outputs(model, request)
        gauge = self.metrics.queue_depth.labels(name)
        entry.in_flight += 1
        gauge.inc()
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if entry.batcher is not None:
                outputs = await entry.batcher.submit(feeds)
            else:
                self.metrics.batch_size.labels(name).observe(_rows(model, feeds))
                if entry.run_s < self.inline_below_s:
                    # A thread hop costs ~50-150 us; for a model faster than that, running on the loop
                    # thread is cheaper than the hop and blocks the loop for less than the hop would.
                    outputs = self._run(entry, model, feeds)
                else:
                    loop = asyncio.get_running_loop()
                    outputs = await loop.run_in_executor(self.executor, self._run, entry, model, feeds)
        finally:
            entry.in_flight -= 1
            gauge.dec()
        tensors = []
        for out_name in wanted:
            array = np.asarray(outputs[out_name])
            tensors.append(Tensor(out_name, datatype_of(array), tuple(array.shape), array))
        return InferenceResponse(name, tensors, entry.version, request.id)

    def _run(self, entry: ModelEntry, model: Model, feeds: Feeds) -> Feeds:
        start = time.perf_counter()
        try:
            return model.predict(feeds)
        finally:
            elapsed = time.perf_counter() - start
            entry.run_s = 0.9 * entry.run_s + 0.1 * elapsed
            self.metrics.inference_duration.labels(entry.name).observe(elapsed)

    @staticmethod
    def _feeds(model: Model, request: InferenceRequest) -> Feeds:
        specs = {s.name: s for s in model.inputs}
        feeds: Feeds = {}
        for t in request.inputs:
            spec = specs.get(t.name)
            if spec is None:
                raise BadRequest(f"unexpected input {t.name!r}; the model takes {sorted(specs)}")
            if t.name in feeds:
                raise BadRequest(f"input {t.name!r} given twice")
            if t.datatype != spec.datatype:
                raise BadRequest(
                    f"input {t.name!r}: datatype {t.datatype} but the model expects {spec.datatype}"
                )
            if len(t.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, t.shape, strict=True)
            ):
                raise BadRequest(f"input {t.name!r}: shape {list(t.shape)} does not match {list(spec.shape)}")
            if t.datatype == "BYTES":
                feeds[t.name] = np.array([v.decode(errors="replace") for v in t.data.ravel()]).reshape(
                    t.shape
                )
            else:
                feeds[t.name] = t.data
        missing = sorted(set(specs) - set(feeds))
        if missing:
            raise BadRequest(f"missing inputs {missing}")
        return feeds

    @staticmethod
    def _wanted_outputs(model: Model, request: InferenceRequest) -> list[str]:
        names = [o.name for o in model.outputs]
        if not request.outputs:
            return names
        unknown = sorted({o.name for o in request.outputs} - set(names))
        if unknown:
            raise BadRequest(f"unknown outputs {unknown}; the model has {names}")
        return [o.name for o in request.outputs]


def _rows(model: Model, feeds: Feeds) -> int:
    if has_dynamic_batch(model) and feeds:
        first = next(iter(feeds.values()))
        return int(first.shape[0]) if first.ndim else 1
    return 1
