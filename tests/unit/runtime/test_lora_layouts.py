"""LoRA-ready models' adapter inputs (lora_layouts.py), model names with an adapter (adapters.py), and the site
text the adapter tests train on (tests/lm_sites.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiri_runtime.adapters import BASE, BadAdapter, check_name, split_model
from kiri_runtime.lora_layouts import LayoutError, LoraLayout, Projection

QKV = Projection(0, "attn/qkv_proj", 8, 16, (("q_proj", 0, 8), ("k_proj", 8, 4), ("v_proj", 12, 4)))
OPROJ = Projection(0, "attn/o_proj", 8, 8, (("o_proj", 0, 8),))
LAYOUT = LoraLayout(("q_proj", "v_proj", "o_proj"), (QKV, OPROJ))


def params(rank: int = 2, **over: np.ndarray | None) -> dict[str, np.ndarray]:
    out = {
        QKV.a: np.zeros((8, rank), np.float32),
        QKV.b: np.zeros((rank, 16), np.float32),
        OPROJ.a: np.zeros((8, rank), np.float32),
        OPROJ.b: np.zeros((rank, 8), np.float32),
    }
    for key, value in over.items():
        name = {"qkv_a": QKV.a, "qkv_b": QKV.b, "o_a": OPROJ.a, "o_b": OPROJ.b}[key]
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


def test_projection_inputs_are_named_after_the_builders_weight_names() -> None:
    assert QKV.a == "model.layers.0.attn.qkv_proj.lora_A"
    assert QKV.b == "model.layers.0.attn.qkv_proj.lora_B"
    assert QKV.rank_dim == "model.layers.0.attn.qkv_proj.lora_r"
    assert QKV.output == "/model/layers.0/attn/qkv_proj/MatMul/output_0"
    assert QKV.part("v_proj") == (12, 4) and QKV.part("o_proj") is None


def test_a_layout_survives_its_json_and_its_file(tmp_path: Path) -> None:
    assert LoraLayout.from_json(json.loads(json.dumps(LAYOUT.to_json()))) == LAYOUT
    LAYOUT.save(tmp_path)
    assert LoraLayout.load(tmp_path) == LAYOUT
    assert LoraLayout.load(tmp_path / "missing") is None


def test_a_layout_of_another_format_or_malformed_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="format 2; this runtime reads 1"):
        LoraLayout.from_json({**LAYOUT.to_json(), "format": 2})
    with pytest.raises(LayoutError, match="malformed: KeyError"):
        LoraLayout.from_json({"format": 1, "targets": []})
    (tmp_path / "lora.json").write_text("{")
    with pytest.raises(LayoutError, match="not readable JSON"):
        LoraLayout.load(tmp_path)


def test_fitting_parameters_pass_and_their_bytes_are_counted() -> None:
    assert LAYOUT.check(params(rank=2)) == 4 * (8 * 2 + 2 * 16 + 8 * 2 + 2 * 8)
    # A projection the adapter leaves out keeps its empty default.
    assert LAYOUT.check(params(rank=3, o_a=None, o_b=None)) == 4 * (8 * 3 + 3 * 16)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"o_b": None},
            "only one of model.layers.0.attn.o_proj.lora_A and model.layers.0.attn.o_proj.lora_B",
        ),
        ({"qkv_a": np.zeros((8, 2), np.float64)}, "lora_A is float64; the model takes float32"),
        (
            {"qkv_a": np.zeros((7, 2), np.float32)},
            r"A is \[7, 2\] and B \[2, 16\]; expected \[8, r\] and \[r, 16\]",
        ),
        ({"qkv_b": np.zeros((3, 16), np.float32)}, r"A is \[8, 2\] and B \[3, 16\]"),
        ({"o_a": np.zeros((8, 2, 1), np.float32)}, "expected two dimensions"),
        ({"o_b": np.full((2, 8), np.nan, np.float32)}, "lora_B holds NaN or infinite values"),
    ],
)
def test_parameters_that_do_not_fit_are_refused_naming_the_input(
    over: dict[str, object], message: str
) -> None:
    with pytest.raises(LayoutError, match=message):
        LAYOUT.check(params(**over))  # type: ignore[arg-type]


def test_an_adapter_with_inputs_the_model_lacks_or_none_at_all_is_refused() -> None:
    with pytest.raises(
        LayoutError, match=r"1 input\(s\) this model does not take, e.g. 'model.layers.9.mlp.x'"
    ):
        LAYOUT.check({**params(), "model.layers.9.mlp.x": np.zeros((1, 1), np.float32)})
    with pytest.raises(LayoutError, match="holds no parameters"):
        LAYOUT.check({})


def test_a_rank_of_zero_is_refused() -> None:
    with pytest.raises(LayoutError, match="1 <= r <= 1024"):
        LAYOUT.check(params(rank=0))


def test_a_model_name_carries_its_adapter_after_a_colon() -> None:
    assert split_model("assistant:site-a") == ("assistant", "site-a")
    assert split_model("assistant") == ("assistant", None)
    assert split_model("assistant:") == ("assistant", "")
    assert split_model(f"assistant:{BASE}") == ("assistant", "base")


@pytest.mark.parametrize("name", ["site-a", "a", "harbour.v2", "s_1", "x" * 63])
def test_adapter_names_like_kubernetes_labels_are_taken(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "base", "Site", "-a", "a-", "a:b", "a/b", "x" * 64, "é"])
def test_other_adapter_names_are_refused(name: str) -> None:
    with pytest.raises(BadAdapter, match="adapter name"):
        check_name(name)


def test_site_texts_use_vocabularies_no_other_site_shares(tmp_path: Path) -> None:
    from lm_sites import SITES, VOCABULARIES, documents, write_site

    words = {
        s: {w for part in VOCABULARIES[s].values() for phrase in part for w in phrase.lower().split()}
        for s in SITES
    }
    for s in SITES:
        others = set().union(*(words[o] for o in SITES if o != s))
        assert words[s] & others <= {"the", "a", "at", "on", "in", "by", "under"}, s
    assert documents("harbour", 3, 1) == documents("harbour", 3, 1)
    assert documents("harbour", 3, 1) != documents("harbour", 3, 2)
    chat = write_site(tmp_path, "orchard", 2, 1, chat=True)
    first = json.loads(chat.read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]


def test_lora_targets_make_any_precision_lora_ready_and_bad_ones_are_refused() -> None:
    from kiri_runtime.compressing.errors import CompressionError
    from kiri_runtime.compressing.lm.building import resolve

    assert resolve("int4", {"loraTargets": "q_proj, v_proj"})["loraTargets"] == ["q_proj", "v_proj"]
    assert resolve("fp32", {"loraTargets": ["o_proj"]}) == {"fuseQkv": True, "loraTargets": ["o_proj"]}
    assert "loraTargets" not in resolve("int8", {})
    with pytest.raises(
        CompressionError, match=r"int4: loraTargets \['lm_head'\]: choose from q_proj, k_proj"
    ):
        resolve("int4", {"loraTargets": "q_proj,lm_head"})
    with pytest.raises(
        CompressionError, match="fp32: loraTargets must be a comma-separated string or a list"
    ):
        resolve("fp32", {"loraTargets": 3})
