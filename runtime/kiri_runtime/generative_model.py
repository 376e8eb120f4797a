"""An onnxruntime-genai model directory, loaded for serving: model, tokenizer, chat template, context length, and
how one request's sampling options become a prefilled `Generator` (generating.py schedules them).

Chat prompts are rendered with the tokenizer's own chat template (chat_template.jinja or tokenizer_config.json's
`chat_template`, through onnxruntime-genai's `apply_chat_template`). A tokenizer without one gets
`FALLBACK_TEMPLATE`: one `role: content` line per message, then `assistant:`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.dataplane import TensorSpec
from kiri_runtime.decoding import SlotDecoder, unsupported
from kiri_runtime.errors import BadRequest
from kiri_runtime.lora_layouts import LoraLayout

GENAI_CONFIG = "genai_config.json"
PLATFORM = "onnxruntime_genai"
# Used when the tokenizer ships no chat template: one "role: content" line per message, then "assistant:".
FALLBACK_TEMPLATE = "{role}: {content}\n"
FALLBACK_GENERATION_PROMPT = "assistant:"
MAX_TOP_LOGPROBS = 20


def is_generative_dir(path: Path) -> bool:
    return path.is_dir() and (path / GENAI_CONFIG).is_file()


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding options, already validated (`openai_api` checks ranges and says which is wrong)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; n: the chosen token's log-probability and the n most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def cohort_key(self) -> tuple[Any, ...] | None:
        """Requests with equal keys may share one batched generator; None: decode alone (seeded)."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.top_k)


class GenerativeModel:
    """An onnxruntime-genai model directory, loaded: model, tokenizer, chat template, context length."""

    platform = PLATFORM
    generative = True
    # What /v2/models/{name} reports: KServe's generate shape (text in, text out), not a tensor signature.
    inputs = [TensorSpec("text_input", "BYTES", (1,))]
    outputs = [TensorSpec("text_output", "BYTES", (1,))]

    def __init__(
        self, model_dir: Path, threads: int | None = None, *, continuous: bool = False, device: str = "cpu"
    ) -> None:
        """With `continuous`, decoding goes through `decoding.SlotDecoder` when the model allows it (`decoder`
        is then set) and onnxruntime-genai's own model is loaded only if something asks for it (edge-cloud
        collaboration): the weights are not held twice. Otherwise onnxruntime-genai's model is loaded now.
        `device` "cuda" decodes on onnxruntime-genai's CUDA provider (`check_device` says what it needs)."""
        import onnxruntime_genai as og

        self.dir = model_dir
        check_device(model_dir, device, og.is_cuda_available())
        cfg = og.Config(str(model_dir))
        if device == "cuda":
            cfg.clear_providers()
            cfg.append_provider("cuda")
            continuous = False  # SlotDecoder drives onnxruntime's CPU provider (decoding.py)
        if threads:
            session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.og = og
        self._config = cfg
        self._model: Any = None
        self._model_lock = threading.Lock()
        self.decoder: SlotDecoder | None = None
        self.decoder_unsupported: str | None = None
        if device == "cuda":
            self.decoder_unsupported = "decoding on cuda: onnxruntime-genai's own generators decode"
        if continuous:
            self.decoder_unsupported = unsupported(model_dir)
            if self.decoder_unsupported is None:
                self.decoder = SlotDecoder(model_dir, threads)
        if self.decoder is None:
            self._model = og.Model(cfg)
        self.tokenizer = og.Tokenizer(cfg)
        genai = json.loads((model_dir / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]
        self.context_length = int(genai["context_length"])
        self.vocab_size = int(genai["vocab_size"])
        self.eos_token_ids = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        self.has_chat_template = _has_chat_template(model_dir)
        self._vocab_text: dict[int, str] = {}
        # LoRA-ready models (lora_layouts.py) take adapters; their container is made on first use.
        self.lora_layout = LoraLayout.load(model_dir)
        self._og_adapters: Any = None

    @property
    def og_adapters(self) -> Any:
        """onnxruntime-genai's adapter container of this model (one per model: a generator takes one)."""
        if self._og_adapters is None:
            self._og_adapters = self.og.Adapters(self.model)
        return self._og_adapters

    @property
    def model(self) -> Any:
        """onnxruntime-genai's model, loaded on first use when `decoder` serves the requests."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = self.og.Model(self._config)
        return self._model

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        if not self.has_chat_template:
            lines = [FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages]
            return "".join(lines) + FALLBACK_GENERATION_PROMPT
        try:
            return str(
                self.tokenizer.apply_chat_template(json.dumps(list(messages)), add_generation_prompt=True)
            )
        except RuntimeError as e:
            raise BadRequest(
                f"the model's chat template cannot render these messages: {first_line(e)}"
            ) from None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def token_text(self, token_id: int) -> str:
        text = self._vocab_text.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode(np.array([token_id], dtype=np.int32)))
            self._vocab_text[token_id] = text
        return text

    def generator(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        max_length: int,
        adapter: str | None = None,
    ) -> Any:
        """A generator over `prompts` (all of one length: one batch row each), prefilled; with `adapter` (a key
        loaded in `og_adapters`) active for its whole life."""
        og = self.og
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("a batch needs prompts of one length (onnxruntime-genai 0.18 pads them wrongly)")
        gp = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": max_length, "do_sample": not params.greedy}
        if len(prompts) > 1:
            options["batch_size"] = len(prompts)
        if not params.greedy:
            options["temperature"] = params.temperature
            options["top_p"] = params.top_p
            options["top_k"] = params.top_k or self.vocab_size
            if params.seed is not None:
                options["random_seed"] = params.seed
        gp.set_search_options(**options)
        generator = og.Generator(self.model, gp)
        if adapter is not None:
            generator.set_active_adapter(self.og_adapters, adapter)
        batch = np.asarray(prompts, dtype=np.int32)
        generator.append_tokens(batch[0] if len(prompts) == 1 else batch)
        return generator

    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise BadRequest("a language model answers /generate and /v1/chat/completions, not tensor requests")


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _built_for(model_dir: Path) -> str:
    """The execution provider the model builder built `model_dir` for ("cpu" when its config names none)."""
    genai = json.loads((model_dir / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]
    options = genai.get("decoder", {}).get("session_options", {}).get("provider_options") or []
    names = [name for entry in options for name in entry]
    return "cuda" if "cuda" in names else "cpu"


def check_device(model_dir: Path, device: str, cuda_available: bool) -> None:
    """Refuse, with what to do instead, a model that cannot decode on `device`: cuda without onnxruntime-genai's
    CUDA build or a GPU, and a pack built for CUDA (the fp16 `--gpu-pack`) on CPU: onnxruntime's CPU provider
    has no fp16 kernels for most of the graph, so it runs one pass and fails at the second token
    (compressing/lm/building.py)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not cpu or cuda")
    if device == "cuda" and not cuda_available:
        raise ValueError(
            "--device cuda: this onnxruntime-genai has no usable CUDA provider (a CPU build, or no GPU visible): "
            "serve on a GPU node with the kiri-runtime-cuda image, or with --device cpu"
        )
    if device == "cpu" and _built_for(model_dir) == "cuda":
        raise ValueError(
            f"{model_dir.name} was built for CUDA (the fp16 GPU pack), which decodes on a GPU only: serve it with "
            "--device cuda on a GPU node, or serve the fp32 pack on CPU"
        )
