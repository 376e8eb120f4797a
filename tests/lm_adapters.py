"""LoRA fixtures the tests build themselves: the tiny LLaMA's onnxruntime-genai build made LoRA-ready, per-site text
(lm_sites.py) and adapters trained on it, exported as onnxruntime-genai loads them.

Cached like lm_fixture.py: under the tiny model's cache directory, keyed by a hash of the code that builds them
(the learning/adapter modules, adapting.py, lora_layouts.py, this file, lm_sites.py) and their parameters, built in a temporary
directory and renamed (atomic).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lm_fixture import _atomic_build, tiny_genai, tiny_llama
from lm_sites import write_site

# The tiny LLaMA's weights are 1.7 MB, so 1 % is 17 KB: rank 4 on q_proj and v_proj (14 KB) fits.
RANK = 4
TARGETS = ("q_proj", "v_proj")
STEPS = 60
TRAIN_DOCS, HELD_OUT_DOCS = 200, 40


def _code_digest(*extra: Any) -> str:
    import kiri_runtime.compressing.lm.adapting as adapting
    import kiri_runtime.learning.adapter_files as adapter_files
    import kiri_runtime.learning.adapters as adapters
    import kiri_runtime.learning.onnx_adapters as onnx_adapters
    import kiri_runtime.learning.site_texts as site_texts
    import kiri_runtime.lora_layouts as layouts

    h = hashlib.sha256()
    modules = (adapting, adapter_files, adapters, onnx_adapters, site_texts, layouts)
    for path in (*(m.__file__ for m in modules), __file__, Path(__file__).parent / "lm_sites.py"):
        h.update(Path(str(path)).read_bytes())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def lora_genai(precision: str = "fp32", targets: tuple[str, ...] = TARGETS) -> Path:
    """The tiny LLaMA's `precision` build with LoRA inputs on `targets` (compressing/lm/adapting.py)."""
    from kiri_runtime.compressing.lm.adapting import add_lora_inputs

    src = tiny_genai(precision=precision)
    dest = src.parent / f"lora-{_code_digest(targets)}-{src.name}"

    def make(tmp: Path) -> None:
        for f in src.iterdir():
            shutil.copy2(f, tmp / f.name)
        add_lora_inputs(tmp, targets)

    return _atomic_build(dest, make)


def site_data(root: Path, site: str) -> tuple[Path, Path]:
    """(train, held-out) JSON Lines of `site` under `root`."""
    return (
        write_site(root / "train", site, TRAIN_DOCS, seed=1),
        write_site(root / "held-out", site, HELD_OUT_DOCS, seed=2),
    )


def site_adapter(site: str, *, rank: int = RANK, steps: int = STEPS, seed: int = 0, lr: float = 3e-3) -> Path:
    """A directory with the peft adapter trained on `site`'s text (adapter/), its result (result.json), the site's
    data (train/, held-out/) and the adapter for the fp32 LoRA-ready build (`<site>.onnx_adapter`)."""
    from kiri_runtime.learning.adapters import train_adapter
    from kiri_runtime.learning.onnx_adapters import export_onnx_adapter
    from kiri_runtime.lora_layouts import LoraLayout

    base = tiny_llama()
    model = lora_genai()
    dest = base.parent / f"adapter-{site}-{_code_digest(site, rank, steps, seed, lr, base.name)}"

    def make(tmp: Path) -> None:
        train, _ = site_data(tmp, site)
        result = train_adapter(
            base,
            train,
            tmp / "adapter",
            rank=rank,
            steps=steps,
            seed=seed,
            targets=TARGETS,
            learning_rate=lr,
            threads=1,
        )
        layout = LoraLayout.load(model)
        assert layout is not None
        export_onnx_adapter(tmp / "adapter", layout, tmp / f"{site}.onnx_adapter")
        info = asdict(result)
        info["adapter_dir"] = "adapter"
        (tmp / "result.json").write_text(json.dumps(info, indent=1, default=str) + "\n")

    return _atomic_build(dest, make)


def og_logits(model_dir: Path, ids: list[int], adapter: Path | None = None) -> Any:
    """Teacher-forced logits [seq, vocab] from onnxruntime-genai, with the adapter file active if given."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    adapters = None
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter), "a")
        generator.set_active_adapter(adapters, "a")
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    out = np.asarray(generator.get_output("logits"), dtype=np.float32)[0]
    del generator
    return out


def encode(model_dir: Path, text: str) -> list[int]:
    import onnxruntime_genai as og

    return [int(t) for t in og.Tokenizer(og.Model(str(model_dir))).encode(text)]
