"""What queued each reconcile: a trace of the operator's work queue, for bench/scale (old and new code alike).

Not part of Kiri: Python imports this module at start-up when its folder is on PYTHONPATH, and it does
something only in a `kiri_operator.cli operator` process with KIRI_TRACE set. It wraps the work queue
(`add`, `add_after`, the worker's handler), the reconciler, the API client's writes and the cache's pod
events, and appends one JSON line per event to `$KIRI_TRACE.<pid>.jsonl`:
- `add`: a key queued, with its cause (the watch handler and event type, `own` when the event's version is
  one the operator wrote, the changed pod fields; `timer`, `resync`, `relist`, `dirty-readd`) and what the
  queue did with it (`queued`, `coalesced` into a waiting key, `dirty` / `dirty-dup` while it ran);
- `reconcile`: the cause that queued it and its outcome (writes, status written or deferred, requeue);
- `after`: a requeue timer asked for (delay; new, replaced, or kept-earlier);
- `write`: an apply or status patch. `bench/scale/tracing/triggers.py` counts them.

It reads private fields of the queue (`_active`, `_queued`, `_dirty`, `_timers`) and walks call frames to
name the cause: a measuring tool for this bench only, written against both versions' names.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _install(out: str) -> None:
    import asyncio
    import atexit
    import dataclasses
    import importlib.abc
    import importlib.util
    import json
    import threading
    import time

    lock = threading.Lock()
    buffer: list[dict[str, Any]] = []
    sink = open(f"{out}.{os.getpid()}.jsonl", "a")  # noqa: SIM115 (open for the process's life)
    written: set[tuple[Any, ...]] = set()  # (kind, namespace, name, resourceVersion) of our writes
    cause_of_key: dict[Any, str] = {}
    pod_diff: dict[int, str] = {}
    outcomes: dict[Any, Any] = {}

    def record(**fields: Any) -> None:
        fields["t"] = time.time()
        with lock:
            buffer.append(fields)

    def flush() -> None:
        with lock:
            items = buffer[:]
            buffer.clear()
        for item in items:
            sink.write(json.dumps(item, default=str) + "\n")
        sink.flush()

    def flusher() -> None:
        while True:
            time.sleep(2)
            flush()

    threading.Thread(target=flusher, daemon=True).start()
    atexit.register(flush)

    def version(kind: Any, body: dict[str, Any]) -> tuple[Any, ...]:
        meta = body.get("metadata") or {}
        return (kind, meta.get("namespace"), meta.get("name"), meta.get("resourceVersion"))

    def cause(frame: Any) -> str:
        f = frame
        for _ in range(6):
            if f is None:
                break
            name, local = f.f_code.co_name, f.f_locals
            kind = (local.get("event") or {}).get("type") if isinstance(local.get("event"), dict) else None
            if name == "_fire":
                return "timer"
            if name == "worker":
                return "dirty-readd"
            if name == "modeldeployment_event":
                own = version("ModelDeployment", local.get("body") or {}) in written
                return f"md:{'own' if own else 'other'}:{kind}"
            if name in ("handler", "child_event"):
                own = version(local.get("kind"), local.get("body") or {}) in written
                return f"child:{local.get('kind')}:{'own' if own else 'other'}:{kind}"
            if name == "pod_event":
                return f"pod:{kind}:{pod_diff.get(threading.get_ident(), '') if kind != 'DELETED' else ''}"
            if name == "node_event":
                return "node"
            if name in ("_resync", "resync"):
                return "resync"
            if name == "relister":
                return "relist"
            if name == "startup":
                return "startup"
            f = f.f_back
        return "unknown:" + frame.f_code.co_name

    def patch_queue(mod: Any) -> None:
        queue = mod.WorkQueue
        add, add_after, worker = queue.add, queue.add_after, queue.worker

        def traced_add(self: Any, key: Any) -> None:
            why = cause(sys._getframe(1))
            if key in self._active:
                state = "dirty-dup" if key in self._dirty else "dirty"
                if state == "dirty":
                    cause_of_key[("dirty", key)] = why
            elif key in self._queued:
                state = "coalesced"
            else:
                state = "queued"
                first = cause_of_key.pop(("dirty", key), why) if why == "dirty-readd" else why
                cause_of_key[key] = first
            record(ev="add", key=key, cause=why, state=state)
            add(self, key)

        def traced_add_after(self: Any, key: Any, seconds: float) -> None:
            old = self._timers.get(key)
            when = asyncio.get_running_loop().time() + seconds
            state = "new" if old is None else ("kept-earlier" if old.when() <= when else "replaced")
            record(ev="after", key=key, delay=seconds, state=state)
            add_after(self, key, seconds)

        def traced_worker(self: Any, handle: Any) -> Any:
            async def traced(key: Any) -> Any:
                why = cause_of_key.pop(key, "?")
                started = time.time()
                result = await handle(key)
                record(
                    ev="reconcile",
                    key=key,
                    cause=why,
                    dur=time.time() - started,
                    outcome=outcomes.pop(key, None),
                    result=repr(result),
                )
                return result

            return worker(self, traced)

        queue.add, queue.add_after, queue.worker = traced_add, traced_add_after, traced_worker

    def patch_reconciling(mod: Any) -> None:
        reconcile = mod.Reconciler.reconcile

        def traced(self: Any, key: Any) -> Any:
            outcome = reconcile(self, key)
            outcomes[key] = dataclasses.asdict(outcome)
            return outcome

        mod.Reconciler.reconcile = traced

    def patch_kube(mod: Any) -> None:
        if getattr(mod.Kube, "_traced", False):
            return
        mod.Kube._traced = True
        apply, apply_status = mod.Kube.apply, mod.Kube.apply_status

        def traced_apply(self: Any, obj: Any) -> Any:
            answer = apply(self, obj)
            written.add(version(answer.get("kind"), answer))
            record(ev="write", kind=answer.get("kind"))
            return answer

        def traced_apply_status(self: Any, namespace: str, name: str, status: Any) -> Any:
            answer = apply_status(self, namespace, name, status)
            written.add(version("ModelDeployment", answer))
            record(ev="write", kind="ModelDeployment/status")
            return answer

        mod.Kube.apply, mod.Kube.apply_status = traced_apply, traced_apply_status

    def patch_caches(mod: Any) -> None:
        put_pod = mod.Cache.put_pod

        def traced_put_pod(self: Any, body: Any) -> Any:
            key = mod.owner_key(body)
            name = (body.get("metadata") or {}).get("name")
            old = (self.pods.get(key) or {}).get(name) if key is not None else None
            result = put_pod(self, body)
            new = (self.pods.get(key) or {}).get(name) if key is not None else None
            if old is None or new is None:
                diff = "new"
            else:
                fields = dataclasses.fields(old)
                diff = ",".join(f.name for f in fields if getattr(old, f.name) != getattr(new, f.name))
            pod_diff[threading.get_ident()] = diff
            return result

        mod.Cache.put_pod = traced_put_pod

    hooks = {
        "kiri_operator.queueing": patch_queue,
        "kiri_operator.reconciling": patch_reconciling,
        "kiri_operator.caches": patch_caches,
        "kiri_operator.kube": patch_kube,  # one module before the kube/ package
        "kiri_operator.kube.client": patch_kube,
    }

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
            if fullname not in hooks:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            loader: Any = spec.loader
            execute = loader.exec_module

            def exec_module(module: Any) -> None:
                execute(module)
                if hasattr(module, "Kube") or not fullname.startswith("kiri_operator.kube"):
                    hooks[fullname](module)

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


if os.environ.get("KIRI_TRACE") and "kiri_operator.cli operator" in " ".join(getattr(sys, "orig_argv", [])):
    _install(os.environ["KIRI_TRACE"])
