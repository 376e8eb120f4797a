"""The Flower side without processes: settings, the round strategy, the shipped Flower App, the SuperLink's TLS."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.supercore.object_ref import validate

from kiri_runtime.learning import certificates, launching, strategies
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.settings import RoundSettings

BASE = {"factory": "torch.nn:Linear", "weights": "w.safetensors", "eval": "e.npz", "out": "out"}


def result(node: int, values: list[float], samples: int) -> tuple[GridClientProxy, FitRes]:
    params = ndarrays_to_parameters([np.asarray(values, dtype=np.float32)])
    metrics = {"site": f"s{node}", "samples": samples}
    return GridClientProxy(node, None, 1), FitRes(Status(Code.OK, ""), params, samples, metrics)  # type: ignore[arg-type]


def strategy(spend: strategies.Spend, noise: float = 0.0) -> strategies.RoundStrategy:
    return strategies.build(
        noise_multiplier=noise,
        clip_norm=1.0,
        trimmed=None,
        sites=3,
        initial=ndarrays_to_parameters([np.zeros(2, np.float32)]),
        admitted={1: "s1", 2: "s2", 3: "s3"},
        fit_config=lambda _: {},
        spend=spend,
    )


def test_a_round_writes_the_ledger_for_the_sites_whose_results_came_before_it_aggregates() -> None:
    calls: list[list[str]] = []
    s = strategy(calls.append)
    params, _ = s.aggregate_fit(1, [result(1, [1, 0], 10), result(3, [0, 4], 990)], [])
    assert calls == [["s1", "s3"]]
    assert params is not None
    # Every site weighs one, whatever it reports: 990 samples do not buy a larger pull.
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [0.5, 2.0])
    assert s.outcome.participants["s3"]["samples"] == 990
    assert s.inner.num_sampled_clients == 2  # the noise is calibrated to the results that arrived


def test_a_ledger_that_cannot_be_written_stops_the_round_before_anything_is_aggregated() -> None:
    def fail(sites: object) -> None:
        raise OSError("disk full")

    s = strategy(fail)
    params, _ = s.aggregate_fit(1, [result(1, [1, 0], 10), result(2, [0, 4], 10)], [])
    assert params is None and s.outcome.aggregate is None
    assert s.outcome.error == "the privacy ledger could not be written: disk full"


def test_the_noise_on_the_average_is_z_times_clip_over_n() -> None:
    s = strategy(lambda _: None, noise=2.0)
    zeros = [result(n, [0.0] * 40_000, 1) for n in (1, 2, 3, 4)]
    s.admitted[4] = "s4"
    params, _ = s.aggregate_fit(1, zeros, [])
    assert params is not None
    assert float(parameters_to_ndarrays(params)[0].std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.02)


def test_trimmed_mean_with_secure_aggregation_is_refused_with_the_reason() -> None:
    with pytest.raises(LearningError, match=r"trimmed-mean needs each site's update in the clear"):
        RoundSettings.from_run_config({**BASE, "aggregation": "trimmed-mean"})
    plain = RoundSettings.from_run_config(
        {**BASE, "aggregation": "trimmed-mean", "secure-aggregation": False}
    )
    assert plain.aggregation == "trimmed-mean"
    with pytest.raises(LearningError, match="secure aggregation needs min-clients >= 2"):
        RoundSettings.from_run_config({**BASE, "min-clients": 1})
    with pytest.raises(LearningError, match="'clip-norm': expected float, got 'big'"):
        RoundSettings.from_run_config({**BASE, "clip-norm": "big"})


def test_secure_aggregation_is_on_unless_the_run_turns_it_off() -> None:
    assert RoundSettings.from_run_config(BASE).secure_aggregation is True
    assert launching.DEFAULTS["secure-aggregation"] is True


def test_the_flower_app_names_kiris_apps_and_declares_every_key_the_apps_read(tmp_path: Path) -> None:
    app = launching.write_app(tmp_path / "app")
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    components = doc["tool"]["flwr"]["app"]["components"]
    for ref in components.values():
        assert validate(ref, check_module=True, project_dir=app) == (True, None)
    assert doc["tool"]["flwr"]["app"]["config"] == launching.DEFAULTS
    settings = RoundSettings.from_run_config({**launching.DEFAULTS, **BASE})
    assert settings.secure_aggregation is True and settings.target_epsilon is None
    with pytest.raises(LearningError, match=r"run config keys \['nope'\] are not Kiri's"):
        launching.submit(tmp_path, "127.0.0.1:1", {"nope": 1}, root_certificates=None, timeout=1)


def test_the_superlinks_certificate_is_signed_by_the_ca_and_names_the_service() -> None:
    tls = certificates.make(["kiri-superlink.ns.svc", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(tls.ca_crt)
    cert = x509.load_pem_x509_certificate(tls.tls_crt)
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["kiri-superlink.ns.svc"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert b"PRIVATE KEY" in tls.tls_key and "PRIVATE" not in repr(tls)
    assert certificates.make(["a"]).ca_crt != tls.ca_crt  # a fresh CA each time


def test_kiri_learn_round_refuses_a_round_without_tls_or_a_readable_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiri_operator.cli import main

    assert main(["learn-round", "--superlink", "x:1", "--run-config-json", '{"round": 1, "out": "o"}']) == 1
    assert capsys.readouterr().err == (
        "kiri learn-round: error: --root-certificates is required (or --insecure, for tests)\n"
    )
    assert main(["learn-round", "--superlink", "x:1", "--insecure", "--run-config-json", "[1]"]) == 1
    assert capsys.readouterr().err == "kiri learn-round: error: --run-config-json: expected a JSON object\n"
    assert main(["learn-round", "--superlink", "x:1", "--insecure", "--run-config-json", "{"]) == 1
    assert capsys.readouterr().err.startswith("kiri learn-round: error: --run-config: Expecting")
    assert main(["learn-round", "--superlink", "x:1", "--insecure", "--run-config-json", '{"out": "o"}']) == 1
    assert "must set 'round' (>= 1) and 'out'" in capsys.readouterr().err


def test_kiri_learn_round_exits_3_on_a_refused_record_unless_any_record_succeeds_as_the_round_job_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiri_operator.cli import main
    from kiri_runtime.learning import rounds

    out = tmp_path / "out"

    def submit(*_: object, **__: object) -> None:  # the Flower run: its ServerApp writes a refused record
        record = rounds.RoundRecord(
            round=3,
            status="refused",
            reason="0 sites admitted",
            base_sha256="0" * 64,
            privacy=rounds.Privacy(noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, epsilon=7.08),
            opened_at="2026-12-06T20:00:00+00:00",
            closed_at="2026-12-06T20:01:00+00:00",
        )
        rounds.dump(record, rounds.round_dir(out, 3))

    monkeypatch.setattr(launching, "submit", submit)
    args = ["learn-round", "--superlink", "x:1", "--insecure", "--work-dir", str(tmp_path / "w")]
    args += ["--run-config-json", f'{{"round": 3, "out": "{out}"}}']
    assert main(args) == 3
    assert main([*args, "--any-record-succeeds"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        '{"round": 3, "status": "refused", "reason": "0 sites admitted"}'
    )


def test_a_superlink_in_a_long_namespace_still_gets_its_certificate() -> None:
    name = "md-superlink." + "n" * 63 + ".svc.cluster.local"  # 94 characters, over a CN's 64
    cert = x509.load_pem_x509_certificate(certificates.make([name]).tls_crt)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [name]


def test_secagg_plus_bounds_each_sites_values_to_the_clipping_range_itself() -> None:
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from kiri_runtime.learning import federating

    workflow = federating.secure_workflow(RoundSettings.from_run_config({**BASE, "clipping-range": 8.0}))
    # What secaggplus_mod does with a site's values: scale by weight / max_weight, quantise, send.
    q_ratio = round(federating.SITE_WEIGHT / workflow.max_weight * workflow.quantization_range)
    scale = q_ratio / workflow.quantization_range
    values = np.asarray([1e6, -1e6, 0.5], dtype=np.float32)
    sent = quantize([values * scale], workflow.clipping_range, workflow.quantization_range)
    received = dequantize(sent, workflow.clipping_range, workflow.quantization_range)[0] / scale
    # Flower's default max_weight 1000 would have let 1e6 through as 8000, and 0.5 to steps of 0.004.
    np.testing.assert_allclose(received, [8.0, -8.0, 0.5], atol=2 * 8.0 / 2**22)


def secure_strategy(calls: list[list[str]]) -> strategies.RoundStrategy:
    return strategies.build(
        noise_multiplier=0.0,
        clip_norm=1.0,
        trimmed=None,
        sites=2,
        initial=ndarrays_to_parameters([np.zeros(2, np.float32)]),
        admitted={1: "s1", 2: "s2"},
        fit_config=lambda _: {},
        spend=calls.append,
        secure_range=8.0,
    )


def test_a_secure_aggregate_outside_the_clipping_range_is_refused_with_the_reason() -> None:
    calls: list[list[str]] = []
    s = secure_strategy(calls)
    # With SecAgg+ every result holds the unmasked average; a NaN site turns it into about 2^31 quanta.
    params, _ = s.aggregate_fit(1, [result(1, [2048.5, 0.1], 1), result(2, [2048.5, 0.1], 1)], [])
    assert params is None and s.outcome.aggregate is None
    assert s.outcome.error == (
        "the secure aggregate has values outside the clipping range ±8 (up to 2048.5): a site sent values "
        "SecAgg+ cannot bound (non-finite or tampered); nothing aggregated"
    )
    assert calls == [["s1", "s2"]]  # the sites' updates went into the aggregate: their spend stays recorded


def test_a_secure_aggregate_inside_the_clipping_range_is_aggregated() -> None:
    s = secure_strategy([])
    params, _ = s.aggregate_fit(1, [result(1, [-8.0, 7.5], 1), result(2, [-8.0, 7.5], 1)], [])
    assert params is not None and s.outcome.error == ""
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [-8.0, 7.5])


def test_a_plain_round_names_the_sites_that_sent_non_finite_values() -> None:
    s = strategy(lambda _: None)
    params, _ = s.aggregate_fit(1, [result(1, [1.0, 0.0], 1), result(2, [np.nan, np.inf], 1)], [])
    assert s.outcome.non_finite == ["s2"]
    assert params is not None and not np.isfinite(parameters_to_ndarrays(params)[0]).all()
