"""Federated LoRA adapters for a causal LM on Flower, real processes: a SuperLink and three SuperNodes over TLS,
SecAgg+ on, FFA-LoRA. Each site writes text from a vocabulary of its own (tests/lm_sites.py); the tiny LLaMA is
built by the tests (tests/lm_fixture.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flower_harness import Federation

from kiri_runtime.learning import adapters
from kiri_runtime.lora_layouts import LoraLayout
from lm_adapters import encode, lora_genai, og_logits
from lm_fixture import tiny_llama
from lm_sites import VOCABULARIES, write_site

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

SITES = sorted(VOCABULARIES)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, Path]]:
    root = tmp_path_factory.mktemp("flower-adapters")
    data = {site: write_site(root / "train", site, 120, seed=1) for site in SITES}
    held_out = root / "held-out.jsonl"
    with held_out.open("w") as fh:
        for site in SITES:
            fh.write(write_site(root / "held-out", site, 20, seed=2).read_text())
    fed = Federation(root, data).start()
    try:
        yield fed, held_out
    finally:
        fed.stop()


def adapter_round(
    root: Path, held_out: Path, number: int, weights: str = "", **extra: object
) -> dict[str, object]:
    return {
        "part": "adapter",
        "base-model": str(tiny_llama()),
        "weights": weights,
        "eval": str(held_out),
        "out": str(root / "out"),
        "round": number,
        "sites": ",".join(SITES),
        "min-clients": 2,
        "deadline-seconds": 600.0,
        "lora-rank": 4,
        "adapter-steps": 40,
        "adapter-seq-len": 32,
        "learning-rate": 0.01,
        "batch-size": 8,
        "clip-norm": 10.0,
        "noise-multiplier": 0.0,
        "ffa": True,
        "a-seed": 7,
        **extra,
    }


def test_an_ffa_lora_round_averages_only_b_through_secagg_and_the_global_adapter_lowers_held_out_loss(
    federation: tuple[Federation, Path],
) -> None:
    fed, held_out = federation
    transcript = fed.root / "transcript"
    record = fed.run_round(adapter_round(fed.root, held_out, 1, transcript=str(transcript)))
    assert record.status == "accepted", record.reason
    assert record.secure_aggregation is True
    assert [p.site for p in record.participants] == SITES
    assert record.model is not None and record.eval_before is not None and record.eval_after is not None
    assert record.eval_after.loss < record.eval_before.loss  # the federated adapter helps the sites' text
    published = adapters.read_weights(Path(record.model.path))
    start = adapters.read_weights(fed.root / "out" / "initial-adapter")
    for name in adapters.a_names(published):  # FFA-LoRA: every A is the one drawn from the shared seed
        np.testing.assert_array_equal(published[name], start[name])
    assert any(np.abs(published[n]).max() > 0 for n in adapters.b_names(published))
    base = adapters.base_weight_bytes(tiny_llama())
    b_bytes = sum(published[n].nbytes for n in adapters.b_names(published))
    assert b_bytes < 0.01 * base
    config = json.loads((Path(record.model.path) / adapters.ADAPTER_CONFIG).read_text())
    assert config["r"] == 4
    # No site's B reached the server: nothing of B's size arrived as floats, only SecAgg+'s masked integers.
    sizes = {published[n].size for n in adapters.b_names(published)}
    for path in sorted((transcript / "0001").glob("*.npz")):
        with np.load(path) as f:
            for key in f.files:
                if f[key].size in sizes:
                    assert not np.issubdtype(f[key].dtype, np.floating), (
                        f"{path.name}:{key} is a clear float tensor"
                    )


def test_with_the_served_models_layout_an_accepted_round_also_writes_the_adapter_the_edge_loads(
    federation: tuple[Federation, Path],
) -> None:
    """What the operator's round Job asks for (planning/learning.py `serve-layout`, from the compression manifest):
    the global adapter as onnxruntime-genai loads it on the LoRA-ready build, the same function as peft's."""
    import hashlib

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fed, held_out = federation
    ready = lora_genai()
    layout = LoraLayout.load(ready)
    assert layout is not None
    config = adapter_round(
        fed.root, held_out, 1, out=str(fed.root / "served"), **{"serve-layout": json.dumps(layout.to_json())}
    )
    record = fed.run_round(config)
    assert record.status == "accepted", record.reason
    assert record.model is not None and record.served is not None
    served = Path(record.served.path)
    assert served == fed.root / "served" / "rounds" / "0001" / "adapter.onnx_adapter"
    assert (record.served.sha256, record.served.bytes) == (
        hashlib.sha256(served.read_bytes()).hexdigest(),
        served.stat().st_size,
    )
    ids = encode(ready, "The skipper mends the nets by the slipway. The deckhand")
    on_edge = og_logits(ready, ids, served)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama()), dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=torch.tensor([ids])).logits[0].numpy()
        reference = PeftModel.from_pretrained(base, record.model.path).eval()(input_ids=torch.tensor([ids]))
    reference_logits = reference.logits[0].numpy()
    assert np.abs(reference_logits - plain).max() > 1e-2  # the round's adapter changes the model's answer
    assert np.abs(on_edge - reference_logits).max() < 2e-3


def test_an_adapter_that_does_not_fit_the_served_model_is_a_skipped_round_with_the_reason(
    federation: tuple[Federation, Path],
) -> None:
    fed, held_out = federation
    # A served model adapted on o_proj only: the round's q_proj and v_proj factors have nowhere to go.
    layout = LoraLayout.load(lora_genai(targets=("o_proj",)))
    assert layout is not None
    config = adapter_round(
        fed.root, held_out, 1, out=str(fed.root / "misfit"), **{"serve-layout": json.dumps(layout.to_json())}
    )
    record = fed.run_round(config)
    assert record.status == "skipped"
    assert record.reason.startswith(
        "the adapter does not fit the served model: the served model takes no adapter"
    )
    assert record.served is None and record.model is None


def test_a_per_site_round_keeps_each_sites_adapter_on_the_site_and_only_its_digest_and_perplexities_leave(
    federation: tuple[Federation, Path],
) -> None:
    import hashlib

    fed, held_out = federation
    layout = LoraLayout.load(lora_genai())
    assert layout is not None
    config = adapter_round(
        fed.root,
        held_out,
        1,
        out=str(fed.root / "per-site"),
        policy="perSite",
        transcript=str(fed.root / "per-site-transcript"),
        **{"serve-layout": json.dumps(layout.to_json())},
    )
    record = fed.run_round(config)
    assert record.status == "accepted", record.reason
    assert record.model is None and record.served is None  # no global adapter: nothing was averaged
    assert [p.site for p in record.participants] == SITES
    for p in record.participants:
        assert p.adapter is not None and p.adapter.file == "round-0001.onnx_adapter"
        kept = fed.work_dir(f"supernode-{p.site}") / "kept"
        served = kept / p.adapter.file
        assert (p.adapter.sha256, p.adapter.bytes) == (
            hashlib.sha256(served.read_bytes()).hexdigest(),
            served.stat().st_size,
        )
        assert (kept / "round-0001" / adapters.ADAPTER_WEIGHTS).is_file()
        # Its own held-out text (one document in ten of its file) is better served by its own adapter.
        assert p.adapter.held_out_adapter_perplexity < p.adapter.held_out_base_perplexity, p.adapter
    # Nothing of any adapter reached the server: no tensor at all came back in the round's replies.
    replies = sorted((fed.root / "per-site-transcript" / "0001").glob("*-train.npz"))
    assert len(replies) == len(SITES)
    for path in replies:
        with np.load(path) as f:
            assert all(f[key].size == 0 for key in f.files), path.name
