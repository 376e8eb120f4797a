"""The LoRA adapters a served language model holds: loaded, swapped and unloaded while it serves.

A request picks an adapter through the model name, as vLLM and LoRAX do: `assistant:site-a` is the model
`assistant` with the adapter `site-a`; `assistant` alone gets the default adapter (`--default-adapter`, the site's
choice, made by the operator) or none; `assistant:base` asks for no adapter whatever the default.

Each adapter is an `.onnx_adapter` file (onnxruntime's adapter format; learning/adapters.py writes it) that
onnxruntime-genai loads into the model's one `og.Adapters` container; a generator takes its adapter when it starts
(`Generator.set_active_adapter`) and keeps it to its end, so a cohort (generating.py) is one adapter's requests.
Before loading, the file's parameters are checked against the model's `lora.json` (lora_layouts.py): a file that
does not fit is refused there (400), never at a request's first decode step.

Swapping without dropping requests: loading a name that is loaded already (`replace`) loads the new file under a
fresh internal key, then points the name at it; requests admitted before keep the old key to their end. An old key
is unloaded from onnxruntime-genai once no admitted request holds it (`users`) and no generator does
(onnxruntime-genai refuses to unload an adapter a generator still references; the decode thread retries then).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiri_runtime.errors import BadRequest, InferenceError, ModelNotFound
from kiri_runtime.lora_layouts import LayoutError, LoraLayout

log = logging.getLogger(__name__)

SEPARATOR = ":"
BASE = "base"  # `model:base`: no adapter, whatever the default
NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
MAX_ADAPTERS = 64


class AdapterNotFound(ModelNotFound):
    """A model name whose adapter part is not loaded (404, as an unknown model)."""


class BadAdapter(BadRequest):
    """An adapter name or file the model cannot take (400)."""


class AdapterConflict(InferenceError):
    """Loaded already without `replace`, or unloading the default adapter (409)."""

    status = 409


def split_model(name: str) -> tuple[str, str | None]:
    """`assistant:site-a` -> ("assistant", "site-a"); `assistant` -> ("assistant", None)."""
    model, sep, adapter = name.partition(SEPARATOR)
    return (model, adapter) if sep else (name, None)


def check_name(name: str) -> str:
    if name == BASE or not NAME.match(name):
        raise BadAdapter(
            f"adapter name {name[:80]!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', starting and "
            f"ending with a letter or digit, and not {BASE!r}"
        )
    return name


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    key: str  # the name inside onnxruntime-genai: unique per load, so a swap never collides with the old one
    sha256: str
    uri: str
    bytes: int  # the adapter's parameter bytes
    rank: int  # the largest projection rank
    loaded_at: float
    load_seconds: float  # reading, checking and loading the file
    fetch_seconds: float = 0.0  # fetching and verifying it before (the node cache's hit, or a download)


def read_params(path: str) -> dict[str, np.ndarray]:
    """An .onnx_adapter file's parameters as numpy arrays (BadAdapter when onnxruntime cannot read it)."""
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(path)
        return {name: np.asarray(value.numpy()) for name, value in fmt.get_parameters().items()}
    except Exception as e:  # onnxruntime's pybind errors: a file that is not an adapter, or truncated
        raise BadAdapter(f"not an onnxruntime adapter file: {_first_line(e)}") from None


class AdapterSet:
    """One model's adapters. `acquire`/`release` run on the event loop; `load`/`unload` in worker threads;
    `collect` on any thread (the decode thread calls it when a cohort ends). One lock guards the tables."""

    def __init__(self, model: Any, layout: LoraLayout | None, model_name: str, default: str | None = None):
        self.model = model  # generative_model.GenerativeModel
        self.layout = layout
        self.model_name = model_name
        self.default = default
        self._active: dict[str, LoadedAdapter] = {}
        self._retired: list[LoadedAdapter] = []
        self._users: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        self.swaps = 0
        # Called (on the releasing thread) when the last request holding a retired adapter ends.
        self.on_retired_free: Callable[[], None] | None = None

    @property
    def og_adapters(self) -> Any:
        return self.model.og_adapters

    # ------------------------------------------------------------ requests (event loop)

    def acquire(self, adapter: str | None) -> LoadedAdapter | None:
        """The adapter a request named (None: the default, if any) held for the request; None: the base."""
        with self._lock:
            name = self.default if adapter is None else adapter
            if name is None or name == BASE:
                return None
            loaded = self._active.get(name)
            if loaded is None:
                raise AdapterNotFound(
                    f"model {self.model_name}{SEPARATOR}{name!s:.80} is not served here: adapter {name!s:.80} "
                    "is not loaded"
                )
            self._users[loaded.key] += 1
            return loaded

    def release(self, loaded: LoadedAdapter) -> None:
        with self._lock:
            self._users[loaded.key] -= 1
            if self._users[loaded.key] > 0:
                return
            del self._users[loaded.key]
            freed = any(a.key == loaded.key for a in self._retired)
        if freed and self.on_retired_free is not None:
            self.on_retired_free()  # the scheduler's decode thread unloads it once its generator is gone

    def listing(self) -> list[LoadedAdapter]:
        with self._lock:
            return sorted(self._active.values(), key=lambda a: a.name)

    def get(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            return self._active.get(name)

    # ------------------------------------------------------------ admin (worker threads)

    def load(
        self,
        name: str,
        path: str,
        *,
        sha256: str = "",
        uri: str = "",
        replace: bool = False,
        fetch_seconds: float = 0.0,
    ) -> LoadedAdapter:
        """Check and load the adapter file at `path` as `name`; with `replace`, swap it in for the loaded one."""
        start = time.perf_counter()
        check_name(name)
        if self.layout is None:
            raise BadAdapter(
                f"model {self.model_name} takes no adapters: it was not built LoRA-ready (no lora.json)"
            )
        with self._lock:
            if name in self._active and not replace:
                raise AdapterConflict(f"adapter {name} is loaded already; set replace to swap it")
            if name not in self._active and len(self._active) >= MAX_ADAPTERS:
                raise AdapterConflict(f"{MAX_ADAPTERS} adapters are loaded; unload one first")
        params = read_params(path)
        try:
            nbytes = self.layout.check(params)
        except LayoutError as e:
            raise BadAdapter(f"adapter {name} does not fit model {self.model_name}: {e}") from None
        key = f"{name}#{next(self._serial)}"
        try:
            self.og_adapters.load(path, key)
        except Exception as e:
            raise BadAdapter(f"onnxruntime-genai cannot load adapter {name}: {_first_line(e)}") from None
        rank = max((t.shape[1] for n, t in params.items() if n.endswith(".lora_A")), default=0)
        loaded = LoadedAdapter(
            name, key, sha256, uri, nbytes, rank, time.time(), time.perf_counter() - start, fetch_seconds
        )
        with self._lock:
            old = self._active.get(name)
            if old is not None and not replace:  # another load of the same name won the race
                self._retired.append(loaded)
                raise AdapterConflict(f"adapter {name} is loaded already; set replace to swap it")
            self._active[name] = loaded
            if old is not None:
                self._retired.append(old)
                self.swaps += 1
        self.collect()
        return loaded

    def unload(self, name: str) -> LoadedAdapter:
        with self._lock:
            if name == self.default:
                raise AdapterConflict(
                    f"adapter {name} is the default of model {self.model_name}; choose another default first"
                )
            loaded = self._active.pop(name, None)
            if loaded is None:
                raise AdapterNotFound(f"adapter {name!s:.80} is not loaded")
            self._retired.append(loaded)
        self.collect()
        return loaded

    def set_default(self, name: str | None) -> None:
        """The adapter a bare model name gets (None or BASE: none)."""
        with self._lock:
            if name is not None and name != BASE and name not in self._active:
                raise AdapterNotFound(f"adapter {name!s:.80} is not loaded")
            self.default = None if name == BASE else name

    # ------------------------------------------------------------ housekeeping

    @property
    def has_retired(self) -> bool:
        return bool(self._retired)

    def collect(self) -> int:
        """Unload retired adapters nothing holds any more; returns how many are still waiting."""
        with self._lock:
            idle = [a for a in self._retired if self._users[a.key] <= 0]
        for loaded in idle:
            try:
                self.og_adapters.unload(loaded.key)
            except Exception as e:
                # "Adapter still in use": a generator of it is not freed yet; the next collect tries again.
                if "in use" in str(e):
                    continue
                log.warning(
                    "adapter %s: onnxruntime-genai refused to unload it: %s", loaded.name, _first_line(e)
                )
            with self._lock:
                self._retired.remove(loaded)
        with self._lock:
            return len(self._retired)

    def loaded_keys(self) -> int:
        """Adapters onnxruntime-genai holds now (active and retired)."""
        with self._lock:
            return len(self._active) + len(self._retired)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
