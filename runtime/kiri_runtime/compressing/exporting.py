"""Sources in, one verified fp32 ONNX model out.

PyTorch sources go through the dynamo exporter (torch.export, then ONNX) with a dynamic batch axis, and the
result is compared with eager PyTorch on the eval inputs: a wrong graph must fail here, loudly, not surface later
as a quietly worse model at the edge.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import re
import shutil
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.evaluating import EvalSet

if TYPE_CHECKING:
    import torch

FORMATS = ("onnx", "torch-export", "torchscript", "factory")
_FACTORY_RE = re.compile(r"^(?P<mod>[A-Za-z_][\w.]*|[^:]+\.py):(?P<fn>[A-Za-z_]\w*)$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def detect_format(source: str, given: str | None) -> str:
    if given:
        if given not in FORMATS:
            raise CompressionError(f"--format {given!r}: use one of {', '.join(FORMATS)}")
        return given
    if _FACTORY_RE.match(source) and not source.startswith(("file:", "http:", "https:")):
        return "factory"
    suffix = Path(urllib.parse.urlparse(source).path).suffix
    by_suffix = {".onnx": "onnx", ".pt2": "torch-export", ".ts": "torchscript", ".jit": "torchscript"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    raise CompressionError(f"cannot tell the format of {source!r}; pass --format ({', '.join(FORMATS)})")


def fetch(uri: str, work_dir: Path, *, expected_sha256: str | None, what: str = "source") -> tuple[Path, str]:
    """A local path for `uri` (a path, file://, http(s):// or s3://) and its sha256, verified when expected."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https", "s3"):
        # The runtime's fetcher: retries with backoff, resumes with Range, verifies the digest, signs S3.
        from kiri_runtime.fetching import ArtifactCache, ArtifactFetcher, FetchError, IntegrityError

        fetcher = ArtifactFetcher(ArtifactCache(work_dir / "fetch-cache"))
        try:
            local = fetcher.fetch(uri, expected_sha256)
        except FetchError as e:
            kind = "sha256 mismatch" if isinstance(e, IntegrityError) else "download failed"
            raise CompressionError(f"{what} {uri}: {kind}: {e}") from None
        finally:
            fetcher.close()
    elif parsed.scheme in ("", "file"):
        local = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else uri)
    else:
        raise CompressionError(
            f"{what} {uri}: unsupported URI scheme {parsed.scheme!r} (use a path, file://, http(s):// or s3://)"
        )
    if not local.is_file():
        raise CompressionError(f"{what} {uri}: no such file")
    digest = sha256_file(local)
    if expected_sha256 is not None and digest != expected_sha256.lower().removeprefix("sha256:"):
        raise CompressionError(f"{what} {uri}: sha256 mismatch: expected {expected_sha256}, got {digest}")
    return local, digest


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints its own step banners and registry warnings; keep our progress output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load_factory(spec: str) -> Callable[..., Any]:
    m = _FACTORY_RE.match(spec)
    if not m:
        raise CompressionError(f"factory {spec!r}: expected 'pkg.module:function' or 'path/file.py:function'")
    mod_name, fn_name = m["mod"], m["fn"]
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise CompressionError(f"factory {spec!r}: no such file {path}")
            name = f"kiri_factory_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
            loader = importlib.util.spec_from_file_location(name, path)
            if loader is None or loader.loader is None:
                raise CompressionError(f"factory {spec!r}: cannot import {path}")
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except CompressionError:
        raise
    except Exception as e:
        raise CompressionError(f"factory {spec!r}: import failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise CompressionError(f"factory {spec!r}: {fn_name!r} is not a callable in {mod_name}")
    return fn  # type: ignore[no-any-return]


def load_state_dict(local: Path) -> dict[str, torch.Tensor]:
    """A factory's `--state-dict`: safetensors (what the learning loop publishes; by suffix or header) or a
    torch state dict (a user's own `torch.save(model.state_dict())`, loaded with `weights_only=True`)."""
    from kiri_runtime import weights as weights_files

    try:
        return weights_files.load(local)
    except weights_files.WeightsError as e:
        raise CompressionError(f"--state-dict: {e}") from None


@dataclass
class TorchModel:
    """What the exporter and the distiller need from a PyTorch source."""

    module: torch.nn.Module  # eager reference (for TorchScript, the ScriptModule)
    program: Any  # torch.export.ExportedProgram or None: what is exported when there is no plain nn.Module
    rebuildable: bool  # a plain nn.Module whose structure the distiller can copy


def load_torch(
    fmt: str, local: Path | None, *, factory: str | None, factory_kwargs: dict[str, Any], seed: int
) -> TorchModel:
    import torch

    torch.manual_seed(seed)
    try:
        if fmt == "factory":
            assert factory is not None
            module = load_factory(factory)(**factory_kwargs)
            if not isinstance(module, torch.nn.Module):
                raise CompressionError(
                    f"factory {factory!r} returned {type(module).__name__}, not a torch.nn.Module"
                )
            if local is not None:
                state = load_state_dict(local)
                try:
                    module.load_state_dict(state)
                except Exception as e:
                    raise CompressionError(
                        f"state dict {local.name} does not fit {factory}: {' '.join(str(e).split())}"
                    ) from None
            return TorchModel(module.eval(), None, rebuildable=True)
        assert local is not None
        if fmt == "torchscript":
            ts = torch.jit.load(str(local), map_location="cpu")  # type: ignore[no-untyped-call]
            return TorchModel(ts.eval(), None, rebuildable=False)
        if fmt == "torch-export":
            ep = torch.export.load(str(local))
            return TorchModel(ep.module(), ep, rebuildable=False)
    except CompressionError:
        raise
    except Exception as e:
        raise CompressionError(
            f"cannot load the {fmt} source {local}: {type(e).__name__}: {str(e)[:500]}"
        ) from None
    raise CompressionError(f"format {fmt!r} is not a PyTorch format")


def _example(evalset: EvalSet) -> tuple[torch.Tensor, ...]:
    import torch

    # Two samples at least: torch.export specializes a batch axis that only ever saw size 1.
    take = [a[:4] if a.shape[0] >= 2 else np.concatenate([a, a]) for a in evalset.arrays]
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in take)


def export(model: TorchModel, evalset: EvalSet, out: Path, *, output_names: list[str] | None = None) -> None:
    """torch → ONNX with the dynamo exporter and a dynamic batch axis on every input."""
    import torch

    args = _example(evalset)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dyn = tuple({0: batch} for _ in args)
    try:
        with _quiet():
            if isinstance(model.module, torch.jit.ScriptModule):
                from torch._export.converter import TS2EPConverter

                program = TS2EPConverter(model.module, args).convert()
            elif model.program is not None:
                program = model.program
            else:
                program = torch.export.export(model.module, args, dynamic_shapes=dyn, strict=False)
            if not _dynamic_batch(program):
                try:
                    program = torch.export.export(program.module(), args, dynamic_shapes=dyn, strict=False)
                except Exception:
                    raise CompressionError(
                        "the torch.export program has a static batch axis and cannot be re-exported with a "
                        "dynamic one; save it with dynamic_shapes={0: torch.export.Dim('batch')} on every input"
                    ) from None
            with torch.no_grad():
                onnx_program = torch.onnx.export(
                    program,
                    args,
                    dynamo=True,
                    input_names=evalset.names,
                    output_names=output_names,
                    verbose=False,
                    optimize=True,
                )
            assert onnx_program is not None
            onnx_program.save(out, external_data=False)
    except CompressionError:
        raise
    except Exception as e:
        first = "\n".join(str(e).strip().splitlines()[:6])
        raise CompressionError(f"cannot export the model to ONNX ({type(e).__name__}): {first}") from None


def _dynamic_batch(program: Any) -> bool:
    import torch

    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if val is None or not val.shape or not isinstance(val.shape[0], torch.SymInt):
                return False
    return True


def verify(
    model: TorchModel, evalset: EvalSet, onnx_outputs: list[np.ndarray[Any, Any]], *, atol: float, rtol: float
) -> float:
    """Max abs error of the ONNX outputs against eager PyTorch; raises past atol + rtol * max|reference|."""
    import torch
    from torch.utils._pytree import tree_leaves

    chunks: list[list[np.ndarray[Any, Any]]] = []
    with torch.no_grad():
        for start in range(0, len(evalset), 64):
            args = [torch.from_numpy(np.ascontiguousarray(a[start : start + 64])) for a in evalset.arrays]
            leaves = [t for t in tree_leaves(model.module(*args)) if isinstance(t, torch.Tensor)]
            chunks.append([t.detach().to(torch.float64).numpy() for t in leaves])
    eager = [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
    if len(eager) != len(onnx_outputs):
        raise CompressionError(f"the ONNX model has {len(onnx_outputs)} outputs, eager PyTorch {len(eager)}")
    worst = 0.0
    for k, (e, o) in enumerate(zip(eager, onnx_outputs, strict=True)):
        if e.shape != o.shape:
            raise CompressionError(
                f"ONNX output {k} has shape {o.shape}, eager PyTorch {e.shape}: export is wrong"
            )
        err = float(np.abs(e - o).max()) if e.size else 0.0
        limit = atol + rtol * float(np.abs(e).max() if e.size else 0.0)
        if not np.isfinite(err) or err > limit:
            raise CompressionError(
                f"exported ONNX model disagrees with eager PyTorch on the eval inputs: output {k} max abs error "
                f"{err:.3g} > tolerance {limit:.3g}. Refusing to build variants from a wrong graph."
            )
        worst = max(worst, err)
    return worst


def onnx_io(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits], [o.name for o in m.graph.output]


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise CompressionError(f"{path.name} is not a valid ONNX model: {str(e).strip()[:500]}") from None


def copy_model(src: Path, dst: Path) -> None:
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CompressionError(f"--factory-kwargs: invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CompressionError("--factory-kwargs: expected a JSON object")
    return value
