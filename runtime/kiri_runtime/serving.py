"""`kiri serve`: wires fetcher, dataplane, cascade and HTTP together and owns the process lifecycle.

Order matters for probes: the HTTP server starts first (live, not ready), then the artifact is fetched,
verified and loaded in a worker thread, and only then does readiness turn true. A failed fetch keeps the
server up and not ready (the cloud fallback, if any, answers) and retries with backoff, so a node whose
link comes back recovers on its own.

The model's kind is detected at load: an onnxruntime-genai model directory (genai_config.json), given as a local
directory or as the single packed tar of `kiri compress` (compressing/lm/packing.py; fetched, verified, unpacked
under the cache dir's `unpacked/<sha256>/`), is a language model served by `generating.Scheduler` behind the
OpenAI and KServe generate routes; anything else is an ONNX file served over OIP v2 tensors.

A LoRA-ready language model (lora.json beside model.onnx) also serves adapters (adapters.py): those named by
`--adapter` are fetched, verified, loaded and pinned before readiness turns true (the `--default-adapter` among
them), and the admin routes (rest_adapters.py) load, swap and unload others while the server runs.

On SIGTERM the server stops being ready, stops accepting connections, lets in-flight requests finish
(up to `shutdown_grace_s`), then exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web

from kiri_runtime.adapters import AdapterSet, BadAdapter, LoadedAdapter
from kiri_runtime.collaborating import Collaborator
from kiri_runtime.collaborations import CollabConfig
from kiri_runtime.dataplane import BatchingConfig, DataPlane, OnnxModel, run_slots
from kiri_runtime.errors import InferenceError, ModelNotReady, is_client_error
from kiri_runtime.fallback import Cascade, CloudClient
from kiri_runtime.fetching import ArtifactCache, ArtifactFetcher, DiskFullError, FetchError, RetryPolicy
from kiri_runtime.generating import Scheduler
from kiri_runtime.generative_model import GenerativeModel, is_generative_dir
from kiri_runtime.intake import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_DECODE_OFFLOAD_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INFLIGHT_BODY_BYTES,
    IntakeConfig,
)
from kiri_runtime.metrics import RuntimeMetrics
from kiri_runtime.rest import RestServer
from kiri_runtime.rest_adapters import AdapterRoutes, AdminAuth

log = logging.getLogger(__name__)


# An admin load answers within seconds or fails: a few quick retries, not the model fetch's minute of backoff.
ADAPTER_RETRY = RetryPolicy(
    attempts=3, backoff_s=0.2, max_backoff_s=1.0, connect_timeout_s=5.0, read_timeout_s=15.0
)


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter `kiri serve` loads before it is ready (`--adapter`)."""

    name: str
    uri: str
    sha256: str = ""


class CacheDirError(OSError):
    """The node cache directory cannot be created or written (see docs/operations.md, "Edge nodes")."""


@dataclass
class ServeConfig:
    model_uri: str
    name: str
    sha256: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    threads: int | None = None
    fallback_url: str | None = None
    fallback_timeout_s: float = 10.0
    confidence_threshold: float | None = None
    queue_limit: int = 0
    cache_dir: Path = Path("/var/cache/kiri")
    revisions_kept: int = 2
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_inflight_body_bytes: int = DEFAULT_MAX_INFLIGHT_BODY_BYTES
    decode_offload_bytes: int = DEFAULT_DECODE_OFFLOAD_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # Pins in the node cache are per namespace and model (`kiri_runtime.artifacts`).
    namespace: str = ""
    fail_ratio: float = 0.0
    fail_seed: int = 0
    delay_ms: float = 0.0
    model_version: str = "1"
    variant: str = ""
    shutdown_grace_s: float = 30.0
    fetch_retry_max_s: float = 60.0
    # Language models: requests decoded at once, and how they share decode steps: "continuous" (every running
    # request a row of one batch, joining and leaving between steps), "cohort" (arrivals with equal prompt
    # lengths and sampling options share an onnxruntime-genai generator) or "none"; see generating.py.
    max_num_seqs: int = 16
    lm_batching: str = "continuous"
    # Language models: where they decode, "cpu" or "cuda" (onnxruntime-genai's CUDA build, the kiri-runtime-cuda
    # image, and a pack built for CUDA: the fp16 pack of `kiri compress --gpu-pack fp16`).
    device: str = "cpu"
    # Language models: edge-cloud collaboration (collaborating.py); the cloud tier is `fallback_url`.
    collaboration: CollabConfig = field(default_factory=CollabConfig)
    # LoRA-ready language models: adapters loaded before readiness, the one a bare model name gets, and the
    # bearer token of the admin routes (rest_adapters.py; None: $KIRI_ADMIN_TOKEN, or the routes are off).
    adapters: tuple[AdapterSpec, ...] = ()
    default_adapter: str | None = None
    admin_token_file: Path | None = None
    # Directories whose files an adapter's file:// URI (or bare path) may name; the directories of the
    # --adapter files are always among them. A token holder cannot make the server read another local file.
    adapter_roots: tuple[Path, ...] = ()


class Server:
    """An in-process server; tests and benchmarks start it on port 0 and read `.port`."""

    def __init__(self, config: ServeConfig, metrics: RuntimeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or RuntimeMetrics()
        self.dataplane = DataPlane(
            self.metrics,
            queue_limit=config.queue_limit,
            fail_ratio=config.fail_ratio,
            fail_seed=config.fail_seed,
            delay_ms=config.delay_ms,
            batching=config.batching,
            workers=run_slots(config.threads),
        )
        self.dataplane.register(config.name, config.model_version, config.variant, config.sha256 or "")
        cloud = CloudClient(config.fallback_url, config.fallback_timeout_s) if config.fallback_url else None
        self.cascade = Cascade(self.dataplane, cloud, config.confidence_threshold)
        intake = IntakeConfig(
            config.max_body_bytes,
            max(config.max_inflight_body_bytes, config.max_body_bytes),
            config.decode_offload_bytes,
            config.body_timeout_s,
        )
        self.rest = RestServer(self.dataplane, self.cascade, intake=intake)
        collab = replace(
            config.collaboration, cloud_url=config.fallback_url, timeout_s=max(config.fallback_timeout_s, 1.0)
        )
        self.rest.generation.collaborator = Collaborator(collab, config.name, self.metrics)
        self.rest.admin = AdapterRoutes(
            AdminAuth(config.admin_token_file),
            config.name,
            self.load_adapter,
            self.unload_adapter,
            self.set_default_adapter,
        )
        self._cache: ArtifactCache | None = None
        # One fetcher for every adapter load: a new one builds an httpx client and its TLS context (~250 ms
        # measured on the benchmark machine, most of a swap).
        self._adapter_fetcher: ArtifactFetcher | None = None
        self._model: Any = None
        self._model_sha = ""
        self._runner: web.AppRunner | None = None
        self._loader: asyncio.Task[None] | None = None
        self.port = config.port
        self.loaded = asyncio.Event()

    async def start(self, load: bool = True) -> None:
        self._runner = web.AppRunner(
            self.rest.app(), access_log=None, shutdown_timeout=self.config.shutdown_grace_s
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        log.info("listening on %s:%d", self.config.host, self.port)
        if load:
            self._loader = asyncio.get_running_loop().create_task(self._load_with_retries())

    async def _load_with_retries(self) -> None:
        """Fetch, verify, load and pin until it works. Every failure, the cache directory's included, is a log
        line and the readiness probe's reason: nothing may end this task silently with the pod live and never
        ready (the cache was once opened outside the retry, and a PermissionError ended it unseen)."""
        cfg = self.config
        delay = 1.0
        while True:
            try:
                await self._load_once()
                self.dataplane.load_error = ""
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Fetch errors, a full disk, or a file ONNX Runtime rejects (its pybind exceptions derive
                # from Exception only): the server stays live and not ready, and tries again later.
                reason = f"model {cfg.name} not loaded: {exc}"
                self.dataplane.load_error = reason
                log.error("%s; retrying in %.0fs", reason, delay)
                await asyncio.sleep(delay)
                delay = min(cfg.fetch_retry_max_s, delay * 2)

    async def _load_once(self) -> None:
        cfg = self.config
        if self._cache is None:
            try:
                self._cache = await asyncio.to_thread(ArtifactCache, cfg.cache_dir, cfg.revisions_kept)
            except OSError as exc:
                # The usual cause on a node: a hostPath the kubelet created root-owned, and a runtime that is
                # not root.
                raise CacheDirError(
                    f"cache dir {cfg.cache_dir} not writable by uid {os.getuid()}: {exc.strerror or exc}"
                ) from exc
        cache = self._cache
        if self._model is None:
            self._model, self._model_sha = await self._load_model(cache)
        model, sha = self._model, self._model_sha
        if isinstance(model, GenerativeModel) and cfg.name not in self.rest.generation.schedulers:
            self.rest.generation.schedulers[cfg.name] = Scheduler(
                model,
                cfg.name,
                self.metrics,
                max_num_seqs=cfg.max_num_seqs,
                queue_limit=cfg.queue_limit,
                batching=cfg.lm_batching,
                step_delay_s=cfg.delay_ms / 1000.0,
                adapters=AdapterSet(model, model.lora_layout, cfg.name),
            )
        if cfg.adapters and not isinstance(model, GenerativeModel):
            raise BadAdapter(f"--adapter: model {cfg.name} is not a language model; adapters need one")
        if isinstance(model, GenerativeModel):
            # Before readiness: a site's default adapter serves its first request. A failure retries with the
            # model (kept loaded); adapters loaded by an earlier try are kept.
            scheduler = self.rest.generation.schedulers[cfg.name]
            for spec in cfg.adapters:
                loaded = scheduler.adapters.get(spec.name)
                if loaded is None or (spec.sha256 and loaded.sha256 != spec.sha256):
                    await self.load_adapter(cfg.name, spec.name, spec.uri, spec.sha256, True, False)
            if cfg.default_adapter is not None:
                scheduler.adapters.set_default(cfg.default_adapter)
        self.dataplane.load(cfg.name, model, sha256=sha)
        if sha:
            try:
                await asyncio.to_thread(cache.pin, sha, cfg.model_uri, cfg.name, cfg.namespace)
            except OSError as exc:
                # The model serves; only the rollback shortcut (N-1 kept on the node) is at risk.
                log.warning("model %s: could not pin %s in %s: %s", cfg.name, sha[:12], cfg.cache_dir, exc)
        self.loaded.set()

    async def _load_model(self, cache: ArtifactCache) -> tuple[Any, str]:
        cfg = self.config
        fetcher = ArtifactFetcher(cache, RetryPolicy(), metrics=self.metrics)
        local_dir = _local_dir(cfg.model_uri)
        sha = ""
        try:
            if local_dir is not None:
                model: Any = await asyncio.to_thread(
                    GenerativeModel,
                    local_dir,
                    cfg.threads,
                    continuous=cfg.lm_batching == "continuous",
                    device=cfg.device,
                )
            else:
                artifact = await asyncio.to_thread(fetcher.open, cfg.model_uri, cfg.sha256)
                with artifact:
                    # From the verified descriptor, not the path: the blob may be swapped meanwhile.
                    sha = artifact.sha256
                    model = await asyncio.to_thread(self._open, artifact.load_path, sha, cache)
        finally:
            fetcher.close()
        return model, sha

    # ------------------------------------------------------------ adapters

    def _adapters(self, model: str) -> AdapterSet:
        scheduler = self.rest.generation.schedulers.get(model)
        if scheduler is None or self._cache is None:
            raise ModelNotReady(f"model {model} is not loaded yet, or is not a language model")
        return scheduler.adapters

    async def load_adapter(
        self, model: str, name: str, uri: str, sha256: str, replace: bool, default: bool
    ) -> LoadedAdapter:
        """Fetch `uri` into the node cache (verified against `sha256`), load it as `name` (swapping it in with
        `replace`), pin it as `<model>:<name>`, and make it the default if asked."""
        adapters, cache = self._adapters(model), self._cache
        assert cache is not None
        if self._adapter_fetcher is None:
            self._adapter_fetcher = ArtifactFetcher(cache, ADAPTER_RETRY, metrics=self.metrics)
        fetcher = self._adapter_fetcher

        def work() -> LoadedAdapter:
            self._check_adapter_path(name, uri)
            try:
                start = time.perf_counter()
                with fetcher.open(uri, sha256 or None) as artifact:
                    fetched = time.perf_counter() - start
                    loaded = adapters.load(
                        name,
                        artifact.load_path,
                        sha256=artifact.sha256,
                        uri=uri,
                        replace=replace,
                        fetch_seconds=fetched,
                    )
            except DiskFullError as e:
                raise ModelNotReady(f"adapter {name}: {e}") from None
            except FetchError as e:  # IntegrityError included: the bytes are not the ones named
                raise BadAdapter(f"adapter {name}: {e}") from None
            try:
                cache.pin(loaded.sha256, uri, f"{model}:{name}", self.config.namespace)
            except OSError as exc:
                log.warning("adapter %s: could not pin %s: %s", name, loaded.sha256[:12], exc)
            if default:
                adapters.set_default(name)
            return loaded

        swap = adapters.get(name) is not None
        try:
            loaded = await asyncio.to_thread(work)
        except InferenceError as exc:
            if is_client_error(exc.status):
                self.metrics.lora_loads.labels(model, "refused").inc()
            raise
        self.metrics.lora_loads.labels(model, "swapped" if swap else "loaded").inc()
        self.metrics.lora_adapters.labels(model).set(len(adapters.listing()))
        return loaded

    def _check_adapter_path(self, name: str, uri: str) -> None:
        """A local adapter file must lie under an adapter root (`ServeConfig.adapter_roots` and the directories
        of the startup adapters), links resolved: the admin routes take a path, not a key to the filesystem."""
        path = _local_path(uri)
        if path is None:
            return
        roots = [*self.config.adapter_roots]
        roots += [p.parent for p in (_local_path(a.uri) for a in self.config.adapters) if p is not None]
        real = path.resolve()
        if not any(real.is_relative_to(root.resolve()) for root in roots):
            allowed = (
                ", ".join(str(r) for r in dict.fromkeys(roots))
                or "none (start kiri serve with --adapter-root)"
            )
            raise BadAdapter(f"adapter {name}: {path} is outside the adapter directories ({allowed})")

    async def unload_adapter(self, model: str, name: str) -> LoadedAdapter:
        adapters = self._adapters(model)
        unloaded = await asyncio.to_thread(adapters.unload, name)
        self.metrics.lora_loads.labels(model, "unloaded").inc()
        self.metrics.lora_adapters.labels(model).set(len(adapters.listing()))
        return unloaded

    async def set_default_adapter(self, model: str, name: str) -> None:
        self._adapters(model).set_default(name)

    def _open(self, load_path: str, sha: str, cache: ArtifactCache) -> OnnxModel | GenerativeModel:
        """The verified blob as a model: a tar holding genai_config.json is a language model, else ONNX."""
        if tarfile.is_tarfile(load_path):
            return GenerativeModel(
                _unpacked(Path(load_path), sha, cache.root / "unpacked"),
                self.config.threads,
                continuous=self.config.lm_batching == "continuous",
                device=self.config.device,
            )
        return OnnxModel(load_path, self.config.threads)

    async def stop(self) -> None:
        self.dataplane.draining = True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()  # stops listening, then waits for in-flight handlers
        await self.cascade.close()
        if self.rest.generation.collaborator is not None:
            await self.rest.generation.collaborator.close()
        await asyncio.to_thread(self.rest.generation.close)
        await self.dataplane.close()
        await asyncio.to_thread(self.rest.intake.close)
        if self._adapter_fetcher is not None:
            self._adapter_fetcher.close()


def _local_path(uri: str) -> Path | None:
    """The file a bare path or file:// URI names; None for a remote URI."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        return Path(unquote(parts.path))
    return None


def _local_dir(uri: str) -> Path | None:
    """A local onnxruntime-genai model directory named by a bare path or file:// URI (served as is, no digest)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("", "file"):
        return None
    path = Path(unquote(parts.path) if parts.scheme else uri)
    return path if is_generative_dir(path) else None


def _unpacked(tar_path: Path, sha: str, root: Path) -> Path:
    """The packed model directory of a verified blob, unpacked once under `root/<sha256>` (atomic rename).

    `tar_path` is the verified descriptor's path (/proc/self/fd/N), so the bytes unpacked are the ones checked."""
    from kiri_runtime.compressing.lm.packing import unpack

    dest = root / sha
    if is_generative_dir(dest):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}.", dir=root))
    try:
        unpack(tar_path, tmp)
        if not is_generative_dir(tmp):
            raise ValueError(f"artifact {sha[:12]} is a tar without genai_config.json")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


async def serve(config: ServeConfig) -> None:
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.info("shutting down: draining in-flight requests")
    await server.stop()
    log.info("stopped")
