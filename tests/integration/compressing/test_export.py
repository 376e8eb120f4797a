"""Sources → verified fp32 ONNX, and the bad inputs that must fail loudly without a manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from compress_helpers import ZOO, load, save_npz
from compress_zoo import mlp

from kiri_runtime import manifests

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Run = Callable[..., tuple[int, str]]


@pytest.fixture
def mlp_source(tmp_path: Path) -> tuple[Path, Path, str]:
    torch.manual_seed(1)
    state = tmp_path / "mlp.pt"
    torch.save(mlp().state_dict(), state)
    data = save_npz(
        tmp_path / "eval.npz", x=np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32)
    )
    return state, data, hashlib.sha256(state.read_bytes()).hexdigest()


def test_factory_with_state_dict_exports_a_verified_dynamic_batch_model(
    tmp_path: Path, run_compress: Run, mlp_source: tuple[Path, Path, str]
) -> None:
    state, data, sha = mlp_source
    out = tmp_path / "out"
    rc, log = run_compress(
        "--source", f"{ZOO}:mlp", "--state-dict", str(state), "--sha256", sha, "--eval-data", str(data),
        "--out", str(out), "--variant", "int8-dynamic", "--latency-rounds", "10", "--model-name", "mlp",
    )  # fmt: skip
    assert rc == 0, log
    m = load(out)
    assert m.model.format == "factory" and m.model.source_sha256 == sha and m.model.name == "mlp"
    assert m.model.export_max_abs_error is not None and m.model.export_max_abs_error < 1e-4
    model_path = out / m.model.uri
    assert hashlib.sha256(model_path.read_bytes()).hexdigest() == m.model.onnx_sha256
    dim0 = onnx.load(str(model_path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value, "batch axis must be dynamic"
    # The exported model answers for batch sizes it never saw, and matches eager PyTorch.
    module = mlp()
    module.load_state_dict(torch.load(state, weights_only=True))
    x = np.random.default_rng(5).standard_normal((7, 16)).astype(np.float32)
    got = ort.InferenceSession(str(model_path)).run(None, {m.model.inputs[0]: x})[0]
    np.testing.assert_allclose(got, module(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    assert "verifying the ONNX model against eager PyTorch" in log
    assert m.eval_data is not None and m.eval_data.samples == 48 and not m.eval_data.synthetic
    assert m.eval_data.sha256 == hashlib.sha256(data.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["torch-export", "torchscript"])
def test_torch_export_and_torchscript_sources(tmp_path: Path, run_compress: Run, fmt: str) -> None:
    torch.manual_seed(2)
    module = mlp().eval()
    x = torch.randn(4, 16)
    if fmt == "torch-export":
        source = tmp_path / "m.pt2"
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(module, (x,), dynamic_shapes=({0: batch},)), source)
    else:
        source = tmp_path / "m.ts"
        torch.jit.save(torch.jit.trace(module, (x,)), source)  # type: ignore[no-untyped-call]
    data = save_npz(
        tmp_path / "eval.npz", x=np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    )
    out = tmp_path / "out"
    rc, log = run_compress(
        "--source", str(source), "--eval-data", str(data), "--out", str(out), "--variant", "fp16",
        "--latency-rounds", "10",
    )  # fmt: skip
    assert rc == 0, log
    m = load(out)
    assert m.model.format == fmt
    assert m.model.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert m.model.export_max_abs_error is not None and m.model.export_max_abs_error < 1e-4


def test_onnx_source_without_eval_data_uses_seeded_random_inputs(tmp_path: Path, run_compress: Run) -> None:
    torch.manual_seed(3)
    src = tmp_path / "m.onnx"
    torch.onnx.export(mlp().eval(), (torch.randn(2, 16),), str(src), dynamo=True, input_names=["x"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False).save(src)  # fmt: skip
    out = tmp_path / "out"
    rc, log = run_compress("--source", f"file://{src}", "--out", str(out), "--variant", "int8-dynamic",
                           "--latency-rounds", "10")  # fmt: skip
    assert rc == 0, log
    assert "random inputs" in log
    m = load(out)
    assert m.model.format == "onnx" and m.model.export_max_abs_error is None
    assert m.variants[0].fidelity is not None and m.variants[0].fidelity.samples == 64
    assert m.eval_data is not None and m.eval_data.synthetic and m.eval_data.uri is None


def _assert_failed(out: Path, rc: int, log: str, message: str) -> None:
    assert rc == 2, log
    assert message in log, log
    assert not (out / manifests.MANIFEST_FILE).exists()
    assert not list(out.glob(".kiri-compress-*")), "scratch files left behind"


def test_export_that_disagrees_with_eager_fails_loudly(tmp_path: Path, run_compress: Run) -> None:
    data = save_npz(tmp_path / "eval.npz", x=np.ones((8, 8), np.float32))
    out = tmp_path / "out"
    rc, log = run_compress("--source", f"{ZOO}:drifting", "--eval-data", str(data), "--out", str(out),
                           "--variant", "int8-dynamic")  # fmt: skip
    _assert_failed(out, rc, log, "disagrees with eager PyTorch")


def test_sha256_mismatch_and_missing_source(
    tmp_path: Path, run_compress: Run, mlp_source: tuple[Path, Path, str]
) -> None:
    state, data, _ = mlp_source
    out = tmp_path / "out"
    out.mkdir()
    # A manifest from an earlier run must not survive a failed one.
    (out / manifests.MANIFEST_FILE).write_text("{}")
    rc, log = run_compress("--source", f"{ZOO}:mlp", "--state-dict", str(state), "--sha256", "0" * 64,
                           "--eval-data", str(data), "--out", str(out), "--variant", "int8-dynamic")  # fmt: skip
    _assert_failed(out, rc, log, "sha256 mismatch")
    rc, log = run_compress("--source", str(tmp_path / "nope.onnx"), "--out", str(out), "--variant", "fp16")
    _assert_failed(out, rc, log, "no such file")


def test_corrupt_onnx_and_unsupported_op(tmp_path: Path, run_compress: Run) -> None:
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    rc, log = run_compress("--source", str(corrupt), "--out", str(out), "--variant", "fp16")
    _assert_failed(out, rc, log, "not a valid ONNX model")

    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    custom = tmp_path / "custom.onnx"
    onnx.save(model, str(custom))
    rc, log = run_compress("--source", str(custom), "--out", str(out), "--variant", "fp16")
    _assert_failed(out, rc, log, "unsupported op")


def test_eval_data_of_the_wrong_shape(
    tmp_path: Path, run_compress: Run, mlp_source: tuple[Path, Path, str]
) -> None:
    state, _, _ = mlp_source
    out = tmp_path / "out"
    bad = save_npz(tmp_path / "bad.npz", x=np.zeros((8, 15), np.float32))
    rc, log = run_compress("--source", f"{ZOO}:mlp", "--state-dict", str(state), "--eval-data", str(bad),
                           "--out", str(out), "--variant", "int8-dynamic")  # fmt: skip
    assert rc == 2 and "eval data" in log and not (out / manifests.MANIFEST_FILE).exists(), log


def test_impossible_gate_is_refused_before_any_work(tmp_path: Path, run_compress: Run) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / manifests.MANIFEST_FILE).write_text("{}")  # from an earlier run: must not survive this one
    rc, log = run_compress("--source", str(tmp_path / "m.onnx"), "--out", str(out), "--variant", "int8-dynamic",
                           "--gate", "cosine.min>=1.5")  # fmt: skip
    assert rc == 2 and "impossible" in log, log
    assert list(out.iterdir()) == []


def test_torch_export_program_with_a_static_batch_is_refused_clearly(
    tmp_path: Path, run_compress: Run
) -> None:
    source = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(mlp().eval(), (torch.randn(4, 16),)), source)
    data = save_npz(tmp_path / "eval.npz", x=np.zeros((8, 16), np.float32))
    out = tmp_path / "out"
    rc, log = run_compress(
        "--source", str(source), "--eval-data", str(data), "--out", str(out), "--variant", "fp16"
    )
    _assert_failed(out, rc, log, "static batch axis")


def test_sources_over_http_are_fetched_and_verified(
    tmp_path: Path, run_compress: Run, mlp_source: tuple[Path, Path, str]
) -> None:
    import functools
    import http.server
    import threading

    state, data, sha = mlp_source
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = tmp_path / "out"
        rc, log = run_compress("--source", f"{ZOO}:mlp", "--state-dict", f"{base}/{state.name}", "--sha256", sha,
                               "--eval-data", f"{base}/{data.name}", "--out", str(out), "--variant", "fp16",
                               "--latency-rounds", "5")  # fmt: skip
        assert rc == 0, log
        assert load(out).model.source_sha256 == sha
        rc, log = run_compress("--source", f"{ZOO}:mlp", "--state-dict", f"{base}/{state.name}", "--sha256",
                               "f" * 64, "--eval-data", str(data), "--out", str(out), "--variant", "fp16")  # fmt: skip
        _assert_failed(out, rc, log, "sha256 mismatch")
        rc, log = run_compress("--source", f"{base}/missing.onnx", "--out", str(out), "--variant", "fp16")
        _assert_failed(out, rc, log, "download failed")
    finally:
        server.shutdown()
        server.server_close()


def test_a_safetensors_state_dict_exports_the_same_model_as_its_torch_file_from_disk_and_over_http(
    tmp_path: Path, run_compress: Run, mlp_source: tuple[Path, Path, str]
) -> None:
    import functools
    import http.server
    import threading

    import safetensors.torch

    state, data, _ = mlp_source
    # What the learning loop publishes for a round (rounds/<NNNN>/weights.safetensors).
    st = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(torch.load(state, weights_only=True), st)
    st_sha = hashlib.sha256(st.read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    onnx_digests = []
    try:
        # The fetch cache names the download by its digest: the format is told by the header, not a suffix.
        for name, source, sha in (("pt", str(state), None), ("file", str(st), st_sha),
                                  ("http", f"{base}/{st.name}", st_sha)):  # fmt: skip
            out = tmp_path / f"out-{name}"
            rc, log = run_compress("--source", f"{ZOO}:mlp", "--state-dict", source, *(["--sha256", sha] if sha else []),
                                   "--eval-data", str(data), "--out", str(out), "--variant", "fp16",
                                   "--latency-rounds", "5")  # fmt: skip
            assert rc == 0, log
            m = load(out)
            assert m.model.source_sha256 == (sha or hashlib.sha256(state.read_bytes()).hexdigest())
            onnx_digests.append(m.model.onnx_sha256)
    finally:
        server.shutdown()
        server.server_close()
    assert len(set(onnx_digests)) == 1, onnx_digests


def test_a_truncated_safetensors_state_dict_fails_with_one_error_line_and_no_manifest(
    tmp_path: Path, run_compress: Run, mlp_source: tuple[Path, Path, str]
) -> None:
    import safetensors.torch

    state, data, _ = mlp_source
    st = tmp_path / "weights.safetensors"
    st.write_bytes(safetensors.torch.save(torch.load(state, weights_only=True))[:-10])
    out = tmp_path / "out"
    rc, log = run_compress("--source", f"{ZOO}:mlp", "--state-dict", str(st), "--eval-data", str(data),
                           "--out", str(out), "--variant", "fp16")  # fmt: skip
    _assert_failed(out, rc, log, f"--state-dict: weights {st}: not a valid safetensors file: ")
    assert "Traceback" not in log
    (line,) = [x for x in log.splitlines() if "--state-dict" in x]
    assert line.endswith("Error while deserializing header: incomplete metadata, file not fully covered")


def test_the_kiri_command_line_runs_compress(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kiri_operator.cli", "compress", "--source", str(tmp_path / "nope.onnx"),
         "--out", str(out), "--variant", "int8-dynamic"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("kiri compress: error:") and "no such file" in proc.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "kiri_operator.cli", "compress", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "--variants-json" in help_text and "top1-agreement" in help_text
