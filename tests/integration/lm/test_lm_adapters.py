"""LoRA adapters for the tiny LLaMA: trained with peft on text the tests make (lm_sites.py), bounded in size, exported
for onnxruntime-genai, and computing there what peft computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiri_runtime.learning.adapters import (
    a_names,
    b_names,
    perplexity,
    read_weights,
    train_adapter,
    write_adapter,
)
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.onnx_adapters import export_onnx_adapter, onnx_adapter_params
from kiri_runtime.lora_layouts import LoraLayout
from lm_adapters import RANK, TARGETS, encode, lora_genai, og_logits, site_adapter, site_data
from lm_sites import write_site

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "The skipper mends the nets by the slipway. The deckhand"


def test_a_lora_ready_build_without_an_adapter_computes_what_the_plain_build_computes() -> None:
    from lm_fixture import tiny_genai

    plain, ready = tiny_genai(), lora_genai()
    ids = encode(plain, PROMPT)
    assert np.array_equal(og_logits(plain, ids), og_logits(ready, ids))
    layout = LoraLayout.load(ready)
    assert layout is not None and layout.targets == TARGETS
    # Fused q|k|v: one LoRA input pair per layer for q_proj and v_proj together.
    assert [(p.layer, p.path, p.in_features, p.out_features) for p in layout.projections] == [
        (0, "attn/qkv_proj", 128, 256),
        (1, "attn/qkv_proj", 128, 256),
    ]


def test_an_exported_adapter_gives_in_onnxruntime_genai_the_logits_peft_gives_in_torch() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lm_fixture import tiny_llama

    trained = site_adapter("harbour")
    ready = lora_genai()
    ids = encode(ready, PROMPT)
    served = og_logits(ready, ids, trained / "harbour.onnx_adapter")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama()), dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=torch.tensor([ids])).logits[0].numpy()
        peft_model = PeftModel.from_pretrained(base, str(trained / "adapter")).eval()
        reference = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    # The adapter moves the logits far more than onnxruntime and torch differ on them.
    assert np.abs(reference - plain).max() > 1.0
    assert np.abs(served - reference).max() < 2e-3


def test_an_adapter_of_at_most_one_percent_of_the_base_halves_its_own_sites_held_out_perplexity(
    tmp_path: Path,
) -> None:
    from lm_fixture import tiny_llama

    trained = site_adapter("harbour")
    result = json.loads((trained / "result.json").read_text())
    assert result["adapter_bytes"] <= 0.01 * result["base_bytes"]
    assert result["adapter_bytes"] == (trained / "adapter" / "adapter_model.safetensors").stat().st_size
    assert result["loss_after"] < result["loss_before"]
    _, held_out = site_data(tmp_path, "harbour")
    base = perplexity(tiny_llama(), held_out, threads=1)
    adapted = perplexity(tiny_llama(), held_out, trained / "adapter", threads=1)
    assert adapted.tokens == base.tokens
    assert adapted.perplexity < 0.5 * base.perplexity, (base.perplexity, adapted.perplexity)


def test_an_adapter_over_the_upload_budget_is_refused_before_training(tmp_path: Path) -> None:
    from lm_fixture import tiny_llama

    train = write_site(tmp_path, "orchard", 10, 1)
    with pytest.raises(
        LearningError, match=r"rank-16 adapter on q_proj,v_proj is 57344 bytes, 3\.\d\d% .* limit is 1%"
    ):
        train_adapter(tiny_llama(), train, tmp_path / "out", rank=16, steps=1)
    assert not (tmp_path / "out").exists()


def test_chat_lines_are_rendered_with_the_base_tokenizers_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from kiri_runtime.learning.site_texts import chat_renderer, load_documents
    from lm_fixture import tiny_llama

    data = write_site(tmp_path, "observatory", 3, 1, chat=True)
    docs = load_documents(data, chat_renderer(AutoTokenizer.from_pretrained(str(tiny_llama()))))
    assert docs[0].startswith(
        "<|im_start|>user\nWhat happens at the observatory?<|im_end|>\n<|im_start|>assistant\n"
    )
    result = train_adapter(tiny_llama(), data, tmp_path / "out", rank=2, steps=2, threads=1)
    assert result.tokens > 0 and result.steps == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", r"data.jsonl:2: expected \{\"text\": \.\.\.\} or"),
        ('{"text": ""}', "data.jsonl:2: text must be a non-empty string"),
        ('{"messages": [{"role": "user"}]}', r"data.jsonl:2: messages\[0\] needs string role and content"),
        ("{not json", "data.jsonl:2: not a JSON object"),
    ],
)
def test_bad_site_data_is_refused_with_its_line_number(tmp_path: Path, line: str, message: str) -> None:
    from lm_fixture import tiny_llama

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(LearningError, match=message):
        train_adapter(tiny_llama(), data, tmp_path / "out", rank=2, steps=1)


def test_ffa_lora_trains_only_b_and_every_site_shares_the_a_its_seed_draws(tmp_path: Path) -> None:
    from lm_fixture import tiny_llama

    results = {}
    for site in ("harbour", "orchard"):
        train = write_site(tmp_path / "data", site, 20, 1)
        train_adapter(
            tiny_llama(),
            train,
            tmp_path / site,
            rank=2,
            steps=3,
            freeze_a=True,
            a_seed=7,
            seed={"harbour": 1, "orchard": 2}[site],
            threads=1,
        )
        results[site] = read_weights(tmp_path / site)
    h, o = results["harbour"], results["orchard"]
    assert a_names(h) and len(a_names(h)) == len(b_names(h)) == 4
    for name in a_names(h):
        assert np.array_equal(h[name], o[name]), name
    assert any(not np.array_equal(h[n], o[n]) for n in b_names(h))
    assert all(np.abs(h[n]).max() > 0 for n in b_names(h))


def test_named_weights_round_trip_and_an_average_starts_the_next_round(tmp_path: Path) -> None:
    from lm_fixture import tiny_llama

    trained = site_adapter("harbour") / "adapter"
    weights = read_weights(trained)
    averaged = {n: (t * 0.5 if n in b_names(weights) else t) for n, t in weights.items()}
    write_adapter(tmp_path / "global", averaged, like=trained)
    assert {n: t.tolist() for n, t in read_weights(tmp_path / "global").items()} == {
        n: t.tolist() for n, t in averaged.items()
    }
    train = write_site(tmp_path / "data", "harbour", 20, 1)
    result = train_adapter(
        tiny_llama(), train, tmp_path / "next", rank=RANK, targets=TARGETS, steps=0, init=averaged, threads=1
    )
    assert result.names == tuple(sorted(weights))
    assert all(np.array_equal(read_weights(tmp_path / "next")[n], averaged[n]) for n in averaged)
    with pytest.raises(LearningError, match="adapter weights do not fit: missing"):
        write_adapter(tmp_path / "bad", {}, like=trained)


def test_an_adapter_on_a_projection_the_served_model_lacks_is_refused_at_export(tmp_path: Path) -> None:
    from lm_fixture import tiny_llama

    train = write_site(tmp_path, "orchard", 20, 1)
    train_adapter(tiny_llama(), train, tmp_path / "o", rank=2, steps=1, targets=("o_proj",), threads=1)
    layout = LoraLayout.load(lora_genai())
    assert layout is not None
    with pytest.raises(
        LearningError, match=r"takes no adapter on layer 0 o_proj \(it adapts q_proj, v_proj\)"
    ):
        export_onnx_adapter(tmp_path / "o", layout, tmp_path / "o.onnx_adapter")
    params = onnx_adapter_params(site_adapter("harbour") / "adapter", layout)
    # q_proj and v_proj of a fused q|k|v: rank 4 + 4 stacked, B block-diagonal, k's columns zero.
    a, b = params["model.layers.0.attn.qkv_proj.lora_A"], params["model.layers.0.attn.qkv_proj.lora_B"]
    assert a.shape == (128, 2 * RANK) and b.shape == (2 * RANK, 256)
    assert (
        not b[:RANK, 128:].any()
        and not b[RANK:, :192].any()
        and b[:RANK, :128].any()
        and b[RANK:, 192:].any()
    )


def test_the_initial_adapter_of_a_federation_is_the_base_with_every_sites_a(tmp_path: Path) -> None:
    from kiri_runtime.learning.adapters import initial_adapter
    from lm_fixture import tiny_llama

    start = initial_adapter(tiny_llama(), tmp_path / "r0", rank=2, a_seed=7)
    assert read_weights(tmp_path / "r0").keys() == start.keys()
    assert all(not start[n].any() for n in b_names(start))
    train = write_site(tmp_path / "data", "harbour", 20, 1)
    train_adapter(tiny_llama(), train, tmp_path / "site", rank=2, steps=2, freeze_a=True, a_seed=7, threads=1)
    trained = read_weights(tmp_path / "site")
    assert all(np.array_equal(trained[n], start[n]) for n in a_names(start))


def test_one_adapter_file_serves_the_int4_variant_too_and_helps_its_site_there() -> None:
    from lm_fixture import tiny_genai
    from lm_sites import documents

    plain, ready = tiny_genai(precision="int4"), lora_genai("int4")
    assert LoraLayout.load(ready) == LoraLayout.load(lora_genai("fp32"))
    text = " ".join(documents("harbour", 4, 9))
    ids = encode(ready, text)
    base = og_logits(ready, ids)
    assert np.array_equal(og_logits(plain, ids), base)
    adapted = og_logits(ready, ids, site_adapter("harbour") / "harbour.onnx_adapter")

    def nll(logits: np.ndarray) -> float:
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        return float(-np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]))

    # Perplexity, as the fp32 test: the int4 base's errors do not undo the adapter (measured 93 -> 20).
    assert np.exp(nll(adapted)) < 0.5 * np.exp(nll(base)), (nll(base), nll(adapted))


# The stated bound: an adapter may not raise another site's held-out perplexity by more than this factor
# (measured worst case on these sites: 1.023, bench/learning/bench_adapters.py).
OTHER_SITES_BOUND = 1.10


def test_an_adapter_helps_its_own_site_and_raises_no_other_sites_perplexity_past_the_bound(
    tmp_path: Path,
) -> None:
    from lm_fixture import tiny_llama
    from lm_sites import SITES

    held_out = {site: site_data(tmp_path / site, site)[1] for site in SITES}
    base = {site: perplexity(tiny_llama(), held_out[site], threads=1).perplexity for site in SITES}
    for adapter_site in SITES:
        adapter = site_adapter(adapter_site) / "adapter"
        for text_site in SITES:
            ratio = (
                perplexity(tiny_llama(), held_out[text_site], adapter, threads=1).perplexity / base[text_site]
            )
            if text_site == adapter_site:
                assert ratio < 0.5, (adapter_site, ratio)
            else:
                assert ratio <= OTHER_SITES_BOUND, (adapter_site, text_site, ratio)


def test_kiri_train_adapter_trains_scores_and_exports_what_kiri_serve_loads(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from lm_fixture import tiny_llama

    train, held_out = site_data(tmp_path / "data", "orchard")
    cmd = [sys.executable, "-m", "kiri_operator.cli", "train-adapter", "--base", str(tiny_llama())]
    cmd += [
        "--data",
        str(train),
        "--out",
        str(tmp_path / "a"),
        "--rank",
        "2",
        "--steps",
        "20",
        "--threads",
        "1",
    ]
    cmd += ["--held-out", str(held_out), "--serve-model", str(lora_genai())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["operator", "runtime"])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["adapterBytes"] == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert report["fraction"] <= 0.01 and report["targets"] == ["q_proj", "v_proj"]
    assert report["heldOut"]["adapter"] < report["heldOut"]["base"]
    assert report["onnxAdapter"] == str(tmp_path / "a" / "adapter.onnx_adapter")
    served = og_logits(lora_genai(), encode(lora_genai(), PROMPT), tmp_path / "a" / "adapter.onnx_adapter")
    assert np.isfinite(served).all()
    refused = subprocess.run(
        [*cmd[:9], str(tmp_path / "b"), "--rank", "16"], capture_output=True, text=True, env=env, timeout=300
    )
    assert refused.returncode == 1
    assert "kiri train-adapter: error: a rank-16 adapter on q_proj,v_proj is 57344 bytes" in refused.stderr


def test_a_compressor_build_with_lora_targets_is_lora_ready(tmp_path: Path) -> None:
    import tempfile

    from kiri_runtime.compressing.lm.building import build
    from lm_fixture import tiny_llama

    with tempfile.TemporaryDirectory(prefix="kiri-builder-cache-") as cache:
        out = build(tiny_llama(), tmp_path / "int4", "int4", {"loraTargets": "q_proj,v_proj"}, Path(cache))
    assert LoraLayout.load(out) == LoraLayout.load(lora_genai("int4"))
    ids = encode(out, PROMPT)
    adapter = site_adapter("harbour") / "harbour.onnx_adapter"
    assert np.array_equal(og_logits(out, ids, adapter), og_logits(lora_genai("int4"), ids, adapter))
