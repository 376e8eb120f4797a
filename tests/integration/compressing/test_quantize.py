"""int8 (dynamic and static), fp16 and the auto-tuner, on real models through real ONNX Runtime sessions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from compress_helpers import ZOO, load, save_npz
from compress_zoo import Encoder, cnn, mlp

from kiri_runtime.compressing.exporting import sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Run = Callable[..., tuple[int, str]]


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_missing_its_gate_is_auto_tuned_to_the_fastest_passing_candidate(
    tmp_path: Path, run_compress: Run
) -> None:
    torch.manual_seed(0)
    state = tmp_path / "enc.pt"
    torch.save(Encoder(outlier=30.0).state_dict(), state)
    data = save_npz(
        tmp_path / "eval.npz", x=np.random.default_rng(0).standard_normal((64, 12, 16)).astype(np.float32)
    )
    out = tmp_path / "out"
    rc, log = run_compress(
        "--source", f"{ZOO}:encoder", "--factory-kwargs", '{"outlier": 30.0}', "--state-dict", str(state),
        "--eval-data", str(data), "--out", str(out), "--variant", "name=int8,method=int8-dynamic",
        "--gate", "int8:cosine.min>=0.99", "--latency-rounds", "20", "--task", "other",
    )  # fmt: skip
    assert rc == 0, log
    v = load(out).variant("int8")
    assert v is not None and v.accepted, v
    first = v.search[0]
    assert first.options["perChannel"] is False and not first.passed, (
        "the per-tensor build must miss this gate"
    )
    assert first.fidelity is not None and first.fidelity.cosine.min < 0.99
    tried = [c.options for c in v.search]
    assert {"perChannel": True} | {
        k: first.options[k] for k in ("reduceRange", "weightType", "excludeNodes")
    } in tried
    # Sensitive nodes were measured, and excluding the worst of them is what made it pass.
    ranked = v.extra["sensitivity"]
    assert ranked == sorted(ranked, key=lambda r: -r["cosineLoss"])
    assert v.options["excludeNodes"] and set(v.options["excludeNodes"]) <= {r["node"] for r in ranked}
    passing = [c for c in v.search if c.passed]
    assert v.options == min(passing, key=lambda c: c.latency.ratio_vs_fp32 if c.latency else 9e9).options
    assert v.fidelity is not None and v.fidelity.cosine.min >= 0.99 and v.fidelity.top1_agreement is None
    assert v.gate[0].passed and v.gate[0].value == v.fidelity.cosine.min
    assert v.uri == "int8.onnx" and sha256_file(out / v.uri) == v.sha256
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & _ops(out / v.uri)
    assert "auto-tuning" in log and "sensitivity" in log


def test_a_gate_no_candidate_meets_rejects_with_the_best_score(tmp_path: Path, run_compress: Run) -> None:
    data = save_npz(
        tmp_path / "eval.npz", x=np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    )
    out = tmp_path / "out"
    rc, log = run_compress(
        "--source", f"{ZOO}:mlp", "--eval-data", str(data), "--out", str(out),
        "--variant", "name=q,method=int8-dynamic", "--gate", "q:max-abs-error<=1e-9", "--latency-rounds", "10",
        "--strict",
    )  # fmt: skip
    assert rc == 3, log  # --strict: a rejected variant fails the run, but the manifest is still written
    v = load(out).variant("q")
    assert v is not None and not v.accepted and v.uri is None and v.sha256 is None
    assert not (out / "q.onnx").exists()
    assert len(v.search) >= 4 and not any(c.passed for c in v.search)
    best = min(c.fidelity.max_abs_error for c in v.search if c.fidelity)
    assert v.fidelity is not None and v.fidelity.max_abs_error == best
    assert "best seen" in v.reason and "max-abs-error" in v.reason


def test_cnn_classifier_static_qdq_dynamic_and_fp16(tmp_path: Path, run_compress: Run) -> None:
    torch.manual_seed(4)
    state = tmp_path / "cnn.pt"
    torch.save(cnn().eval().state_dict(), state)
    data = save_npz(
        tmp_path / "eval.npz", x=np.random.default_rng(1).standard_normal((48, 1, 12, 12)).astype(np.float32)
    )
    variants = [
        {"name": "static", "method": "int8-static", "options": {"perChannel": True},
         "gate": [{"metric": "top1-agreement", "op": ">=", "threshold": 0.9}]},
        {"name": "dyn", "method": "int8-dynamic", "options": {}},
        {"name": "half", "method": "fp16", "options": {},
         "gate": [{"metric": "cosine", "stat": "p5", "op": ">=", "threshold": 0.999}]},
    ]  # fmt: skip
    spec = tmp_path / "variants.json"
    spec.write_text(json.dumps({"variants": variants}))
    out = tmp_path / "out"
    rc, log = run_compress("--source", f"{ZOO}:cnn", "--state-dict", str(state), "--eval-data", str(data),
                           "--out", str(out), "--variants-json", str(spec), "--latency-rounds", "10")  # fmt: skip
    assert rc == 0, log
    m = load(out)
    static, dyn, half = (m.variant(n) for n in ("static", "dyn", "half"))
    assert static is not None and dyn is not None and half is not None
    assert (
        static.accepted and static.options["calibrationMethod"] == "minmax" and static.options["perChannel"]
    )
    assert "calibrating static" in log
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out / "static.onnx")
    assert static.fidelity is not None and static.fidelity.top1_agreement is not None
    assert (
        static.gate[0].metric == "top1-agreement" and static.gate[0].value == static.fidelity.top1_agreement
    )
    assert dyn.gate[0].describe() == "cosine.min>=0.99"  # the default gate when none is given
    assert half.accepted and half.latency is not None and half.latency.ratio_vs_fp32 > 0
    half_model = onnx.load(str(out / "half.onnx"))
    # fp16 inside, fp32 at the edges so clients need not change.
    assert half_model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in half_model.graph.initializer)
    for v in (static, dyn, half):
        assert v.size_bytes == (out / f"{v.name}.onnx").stat().st_size
        assert v.latency is not None and v.latency.p50_ms > 0
    assert half.size_ratio_vs_fp32 is not None and half.size_ratio_vs_fp32 < 1


def test_runs_are_deterministic_under_a_seed(tmp_path: Path, run_compress: Run) -> None:
    data = save_npz(
        tmp_path / "eval.npz", x=np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    )
    shas = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        rc, log = run_compress("--source", f"{ZOO}:mlp", "--eval-data", str(data), "--out", str(out), "--seed", "7",
                               "--variant", "name=s,method=int8-static", "--variant", "fp16",
                               "--latency-rounds", "5")  # fmt: skip
        assert rc == 0, log
        m = load(out)
        shas.append((m.model.onnx_sha256, [(v.name, v.sha256, v.fidelity) for v in m.variants]))
    assert shas[0] == shas[1]
    assert mlp is not None
