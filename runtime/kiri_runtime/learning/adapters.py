"""LoRA adapters for a causal language model: trained on one site's text, read and written as named arrays, and
judged by held-out perplexity. This is the trainer that `kiri train-adapter` and Flower's ClientApp call; only the
adapter (`adapter_model.safetensors`, a few kilobytes to megabytes) ever leaves the site.

The base model is a Hugging Face checkpoint directory (config.json, weights, tokenizer with its chat template);
the adapter is peft's own layout (adapter_config.json + adapter_model.safetensors), so peft, transformers and
onnxruntime-genai's model builder (`adapter_path`) all read it. Site text is JSON Lines, one document a line:
`{"text": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}` (rendered with the base tokenizer's chat
template). Documents are tokenized, each followed by the end-of-sequence token, packed into one stream and cut
into windows of `seq_len` tokens; training draws windows at random (seeded), the loss covers every token.

Named arrays (`read_weights`, `write_adapter`): peft's tensor names as stored, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([rank, in]) and `...lora_B.weight`
([out, rank]); the effective update of that Linear is (alpha / rank) * B @ A. FedAvg averages both factors;
FFA-LoRA (`freeze_a=True`) keeps every A at the value drawn from `a_seed`, equal on every site, and trains
only B, so averaging B (`b_names`) averages the dense updates exactly.

The upload is bounded: `max_fraction` (default 1 %) of the base model's weight bytes; a rank or target set that
would exceed it is refused before any training, with the sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiri_runtime.learning.errors import LearningError
from kiri_runtime.lora_layouts import LoraLayout

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Every attention and MLP projection of a LLaMA-family decoder (what QLoRA adapts); `DEFAULT_TARGETS` is the
# subset trained unless told otherwise (see docs/learning.md, "Adapters": measured on the tiny LLaMA).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")
MAX_FRACTION = 0.01
MAX_LINE_BYTES = 1 << 20
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class AdapterSettings:
    """What to train and how. `alpha` None: 2 x rank (scaling 2, peft's common choice)."""

    rank: int = 8
    alpha: int | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 100
    learning_rate: float = 3e-3
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    # Seeds every lora_A; sites of one federation share it, so FFA-LoRA's frozen A is the same everywhere.
    a_seed: int = 0
    freeze_a: bool = False
    max_fraction: float = MAX_FRACTION
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 1024:
            raise LearningError(f"LoRA rank {self.rank} is out of range [1, 1024]")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise LearningError(
                f"need steps >= 0, batch size >= 1, seq_len >= 2 (got {self.steps}, {self.batch_size}, "
                f"{self.seq_len})"
            )
        if not self.learning_rate > 0:
            raise LearningError(f"learning rate must be > 0, got {self.learning_rate}")
        if not self.targets:
            raise LearningError("no target modules: name at least one projection, e.g. q_proj")
        if not 0 < self.max_fraction <= 1:
            raise LearningError(f"max_fraction must be in (0, 1], got {self.max_fraction}")

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.rank


@dataclass
class AdapterResult:
    """A trained adapter on disk and what it cost."""

    adapter_dir: Path
    adapter_bytes: int  # the size of adapter_model.safetensors: what is uploaded
    base_bytes: int  # the base checkpoint's weight files
    sha256: str  # of adapter_model.safetensors
    tokens: int  # site tokens in the packed stream
    windows: int
    steps: int
    loss_before: float  # mean loss on the site's windows with the adapter's starting weights
    loss_after: float
    names: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.adapter_bytes / self.base_bytes if self.base_bytes else math.inf


@dataclass(frozen=True)
class Perplexity:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


# --------------------------------------------------------------------------------------------- data


def load_documents(data_path: Path, render_chat: Any = None) -> list[str]:
    """The site's documents as text. `render_chat(messages) -> str` renders a chat line (the tokenizer's
    template); without it, chat lines are refused."""
    if not data_path.is_file():
        raise LearningError(f"site data {data_path} does not exist")
    docs: list[str] = []
    with data_path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            if len(raw) > MAX_LINE_BYTES:
                raise LearningError(f"{data_path}:{number}: line over {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as e:
                raise LearningError(f"{data_path}:{number}: not a JSON object: {e}") from None
            docs.append(_document(record, f"{data_path}:{number}", render_chat))
    if not docs:
        raise LearningError(f"site data {data_path} holds no documents")
    return docs


def _document(record: Any, where: str, render_chat: Any) -> str:
    if not isinstance(record, dict):
        raise LearningError(f'{where}: expected {{"text": ...}} or {{"messages": [...]}}')
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise LearningError(f"{where}: text must be a non-empty string")
        return text
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LearningError(f'{where}: expected {{"text": ...}} or a non-empty {{"messages": [...]}}')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LearningError(f"{where}: messages[{i}] needs string role and content")
    if render_chat is None:
        raise LearningError(f"{where}: a chat line needs the base tokenizer's chat template")
    return str(render_chat(messages))


def _tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base))
    except Exception as e:
        raise LearningError(f"{base}: no usable tokenizer: {type(e).__name__}: {e}") from None


def _chat_renderer(tok: Any) -> Any:
    if not getattr(tok, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]]) -> str:
        return str(tok.apply_chat_template(messages, tokenize=False))

    return render


def token_stream(tok: Any, docs: Iterable[str]) -> list[int]:
    """Documents tokenized and packed, each followed by the tokenizer's end-of-sequence token."""
    eos = tok.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(int(eos))
    return stream


def windows(stream: Sequence[int], seq_len: int) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens; a short stream is one shorter window."""
    n = len(stream) // seq_len
    if n == 0:
        if len(stream) < 2:
            raise LearningError(f"site data holds {len(stream)} token(s); at least 2 are needed")
        return np.asarray([stream], dtype=np.int64)
    return np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


# --------------------------------------------------------------------------------------------- model


def base_weight_bytes(base: Path) -> int:
    """The bytes of the base checkpoint's weight files (what 'the base model's bytes' means for the budget)."""
    if not base.is_dir():
        raise LearningError(f"base model {base} is not a directory")
    total = sum(
        p.stat().st_size
        for p in base.iterdir()
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("adapter_")
    )
    if not total:
        raise LearningError(f"base model {base} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return total


def _load_base(base: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    except Exception as e:
        raise LearningError(f"{base}: not a causal LM checkpoint: {type(e).__name__}: {e}") from None
    model.config.use_cache = False
    return model


def _target_linears(model: Any, targets: Sequence[str]) -> dict[str, Any]:
    import torch

    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in targets
    }
    missing = sorted(set(targets) - {n.rpartition(".")[2] for n in found})
    if missing:
        raise LearningError(f"target modules {missing} are not Linear layers of this model")
    return found


def planned_bytes(model: Any, settings: AdapterSettings) -> int:
    """float32 bytes of the adapter's tensors: rank x (in + out) per targeted Linear."""
    linears = _target_linears(model, settings.targets)
    return sum(4 * settings.rank * (m.in_features + m.out_features) for m in linears.values())


def _check_budget(adapter_bytes: int, base_bytes: int, settings: AdapterSettings) -> None:
    limit = settings.max_fraction * base_bytes
    if adapter_bytes > limit:
        raise LearningError(
            f"a rank-{settings.rank} adapter on {','.join(settings.targets)} is {adapter_bytes} bytes, "
            f"{100 * adapter_bytes / base_bytes:.2f}% of the base's {base_bytes}; the limit is "
            f"{100 * settings.max_fraction:g}%: lower the rank or target fewer modules"
        )


def _peft_model(model: Any, settings: AdapterSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    _seed_a(peft_model, settings.a_seed)
    return peft_model


def _seed_a(peft_model: Any, seed: int) -> None:
    """Every lora_A drawn as peft draws it (kaiming-uniform, a = sqrt(5)), from a generator seeded by `seed` and
    the tensor's name: the same A on every site that shares `seed`, whatever else the process drew before."""
    import torch

    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." not in name:
                continue
            digest = hashlib.sha256(f"{seed}:{_stored_name(name)}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
            p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)


def _stored_name(param_name: str) -> str:
    """peft's parameter name without the adapter name: the key saved in adapter_model.safetensors."""
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def _lora_params(peft_model: Any) -> dict[str, torch.nn.Parameter]:
    return {
        _stored_name(n): p for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n
    }


def set_weights(peft_model: Any, weights: Mapping[str, np.ndarray]) -> None:
    """Load named arrays (`read_weights`' names) into a peft model's LoRA factors; names and shapes must match."""
    import torch

    params = _lora_params(peft_model)
    _check_names(weights, {n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, array in weights.items():
            params[name].copy_(torch.as_tensor(np.asarray(array, dtype=np.float32)))


def get_weights(peft_model: Any) -> dict[str, np.ndarray]:
    """A peft model's LoRA factors as named float32 arrays, sorted by name."""
    params = _lora_params(peft_model)
    return {n: params[n].detach().cpu().numpy().astype(np.float32) for n in sorted(params)}


def _check_names(weights: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise LearningError(f"adapter weights do not fit: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, shape in expected.items():
        got = tuple(np.shape(weights[name]))
        if got != shape:
            raise LearningError(f"adapter tensor {name!r} has shape {list(got)}, expected {list(shape)}")


def a_names(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n.endswith(A_SUFFIX))


def b_names(names: Iterable[str]) -> list[str]:
    """The factors FFA-LoRA averages (and trains): every lora_B."""
    return sorted(n for n in names if n.endswith(B_SUFFIX))


# --------------------------------------------------------------------------------------------- files


def read_weights(adapter_dir: Path) -> dict[str, np.ndarray]:
    """An adapter directory's tensors as named float32 arrays (sorted by name)."""
    from safetensors.numpy import load_file

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise LearningError(f"{adapter_dir} holds no {ADAPTER_WEIGHTS}")
    try:
        loaded = load_file(str(path))
    except Exception as e:
        raise LearningError(f"{path}: not readable safetensors: {e}") from None
    out = {n: np.asarray(loaded[n], dtype=np.float32) for n in sorted(loaded)}
    for n, t in out.items():
        if not np.isfinite(t).all():
            raise LearningError(f"{path}: tensor {n!r} holds NaN or infinite values")
    return out


def read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LearningError(f"{path}: not readable: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LearningError(f"{path}: not a LoRA adapter config (peft_type LORA)")
    return config


def write_adapter(adapter_dir: Path, weights: Mapping[str, np.ndarray], like: Path) -> Path:
    """Write named arrays as an adapter directory whose config is `like`'s (e.g. a round's averaged adapter).
    The names and shapes must be those of `like`'s weights."""
    from safetensors.numpy import save_file

    config = read_config(like)
    reference = read_weights(like)
    _check_names(weights, {n: t.shape for n, t in reference.items()})
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in sorted(weights)}
    tmp = adapter_dir / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(adapter_dir / ADAPTER_WEIGHTS)
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return adapter_dir


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- training


def _mean_loss(model: Any, data: torch.Tensor, batch_size: int) -> Perplexity:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data[i : i + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += x[:, 1:].numel()
    return Perplexity(total / count, count)


class _Threads:
    """torch's intra-op threads for the duration of a call (the machine's other users keep their cores)."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.before = 0

    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.before)


def train_adapter(
    base_model_dir: Path,
    data_path: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    steps: int = 100,
    seed: int = 0,
    alpha: int | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    learning_rate: float = 3e-3,
    batch_size: int = 8,
    seq_len: int = 128,
    a_seed: int = 0,
    freeze_a: bool = False,
    init: Mapping[str, np.ndarray] | None = None,
    max_fraction: float = MAX_FRACTION,
    threads: int | None = None,
) -> AdapterResult:
    """Train a LoRA adapter for the causal LM in `base_model_dir` on the JSON Lines text in `data_path`, and write
    it to `out_dir` (peft's layout). `init`: named arrays to start from (a round's global adapter), else A from
    `a_seed` and B zero. `freeze_a`: FFA-LoRA (only B trained). Refused before training if the adapter would be
    over `max_fraction` of the base's weight bytes."""
    import torch

    settings = AdapterSettings(
        rank=rank,
        alpha=alpha,
        targets=tuple(targets),
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        a_seed=a_seed,
        freeze_a=freeze_a,
        max_fraction=max_fraction,
        threads=threads,
    )
    base_bytes = base_weight_bytes(base_model_dir)
    tok = _tokenizer(base_model_dir)
    stream = token_stream(tok, load_documents(data_path, _chat_renderer(tok)))
    data = torch.as_tensor(windows(stream, seq_len))
    with _Threads(threads):
        torch.manual_seed(seed)
        model = _load_base(base_model_dir)
        for p in model.parameters():
            p.requires_grad_(False)
        _check_budget(planned_bytes(model, settings), base_bytes, settings)
        peft_model = _peft_model(model, settings)
        if init is not None:
            set_weights(peft_model, init)
        trained = [
            p
            for n, p in peft_model.named_parameters()
            if ".lora_B." in n or (".lora_A." in n and not freeze_a)
        ]
        for p in peft_model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        probe = data[: max(1, min(len(data), 4 * batch_size))]
        before = _mean_loss(peft_model, probe, batch_size)
        optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        peft_model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=gen)
            x = data[idx]
            loss = peft_model(input_ids=x, labels=x).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = _mean_loss(peft_model, probe, batch_size)
        weights = get_weights(peft_model)
        for name, t in weights.items():
            if not np.isfinite(t).all():
                raise LearningError(f"training diverged: {name} holds NaN or infinite values; lower the rate")
        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    weights_file = out_dir / ADAPTER_WEIGHTS
    adapter_bytes = weights_file.stat().st_size
    _check_budget(adapter_bytes, base_bytes, settings)
    return AdapterResult(
        adapter_dir=out_dir,
        adapter_bytes=adapter_bytes,
        base_bytes=base_bytes,
        sha256=_sha256(weights_file),
        tokens=len(stream),
        windows=len(data),
        steps=steps,
        loss_before=before.nll,
        loss_after=after.nll,
        names=tuple(weights),
        settings={
            "rank": rank,
            "alpha": settings.lora_alpha,
            "targets": list(settings.targets),
            "freezeA": freeze_a,
            "aSeed": a_seed,
        },
    )


def initial_adapter(
    base_model_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    a_seed: int = 0,
    max_fraction: float = MAX_FRACTION,
) -> dict[str, np.ndarray]:
    """The untrained adapter a federation starts from (A drawn from `a_seed`, B zero: the base's own output),
    written to `out_dir` and returned as named arrays; what a ServerApp hands out as round 1's parameters."""
    import torch

    settings = AdapterSettings(
        rank=rank, alpha=alpha, targets=tuple(targets), a_seed=a_seed, max_fraction=max_fraction
    )
    base_bytes = base_weight_bytes(base_model_dir)
    model = _load_base(base_model_dir)
    _check_budget(planned_bytes(model, settings), base_bytes, settings)
    with torch.no_grad():
        peft_model = _peft_model(model, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return get_weights(peft_model)


def perplexity(
    base_model_dir: Path,
    data_path: Path,
    adapter_dir: Path | None = None,
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    threads: int | None = None,
) -> Perplexity:
    """Held-out perplexity of the text in `data_path` under the base model, or the base with `adapter_dir`."""
    import torch

    tok = _tokenizer(base_model_dir)
    data = torch.as_tensor(
        windows(token_stream(tok, load_documents(data_path, _chat_renderer(tok))), seq_len)
    )
    with _Threads(threads):
        model = _load_base(base_model_dir)
        if adapter_dir is not None:
            from peft import PeftModel

            read_config(adapter_dir)
            try:
                model = PeftModel.from_pretrained(model, str(adapter_dir))
            except Exception as e:
                raise LearningError(f"{adapter_dir}: does not fit {base_model_dir}: {e}") from None
        return _mean_loss(model, data, batch_size)


# --------------------------------------------------------------------------------------------- serving form

ONNX_ADAPTER_SUFFIX = ".onnx_adapter"
_PEFT_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _scaling(config: Mapping[str, Any]) -> float:
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise LearningError(
                f"adapter config: {key} is not supported (one rank and alpha for every module)"
            )
    if config.get("use_dora"):
        raise LearningError("adapter config: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise LearningError("adapter config: LoRA biases are not supported (bias must be 'none')")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def onnx_adapter_params(adapter_dir: Path, layout: LoraLayout) -> dict[str, np.ndarray]:
    """A peft adapter as the named inputs of a LoRA-ready model (lora_layouts.py): per projection A [in, R] and
    B [R, out] with the scaling folded into B; the modules of a fused projection stacked (block-diagonal B)."""
    scale = _scaling(read_config(adapter_dir))
    weights = read_weights(adapter_dir)
    factors: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, t in weights.items():
        m = _PEFT_NAME.search(name)
        if m is None:
            raise LearningError(
                f"adapter tensor {name!r} is not a LoRA factor of a decoder layer's projection"
            )
        factors.setdefault((int(m[1]), m[2]), {})[m[3]] = t
    params: dict[str, np.ndarray] = {}
    used: set[tuple[int, str]] = set()
    for p in layout.projections:
        present = [(part, factors[(p.layer, part[0])]) for part in p.parts if (p.layer, part[0]) in factors]
        if not present:
            continue
        rank = sum(f["A"].shape[0] for _, f in present)
        a = np.zeros((p.in_features, rank), dtype=np.float32)
        b = np.zeros((rank, p.out_features), dtype=np.float32)
        row = 0
        for (module, start, width), f in present:
            if "A" not in f or "B" not in f:
                raise LearningError(f"layer {p.layer} {module}: the adapter lacks lora_A or lora_B")
            r = f["A"].shape[0]
            if f["A"].shape != (r, p.in_features) or f["B"].shape != (width, r):
                raise LearningError(
                    f"layer {p.layer} {module}: A {list(f['A'].shape)} and B {list(f['B'].shape)} do not fit "
                    f"the served model's [r, {p.in_features}] and [{width}, r]"
                )
            a[:, row : row + r] = f["A"].T
            b[row : row + r, start : start + width] = scale * f["B"].T
            row += r
            used.add((p.layer, module))
        params[p.a], params[p.b] = a, b
    left = sorted(set(factors) - used)
    if left:
        layer, module = left[0]
        raise LearningError(
            f"the served model takes no adapter on layer {layer} {module} (it adapts {', '.join(layout.targets)}); "
            "rebuild it LoRA-ready for these targets or train on fewer"
        )
    layout.check(params)
    return params


def export_onnx_adapter(adapter_dir: Path, layout: LoraLayout, out_file: Path) -> int:
    """Write the adapter as onnxruntime-genai loads it (`og.Adapters.load`): a `.onnx_adapter` file (onnxruntime's
    flatbuffers adapter format) of the LoRA-ready model's inputs. Returns its size in bytes."""
    import onnxruntime as ort

    params = onnx_adapter_params(adapter_dir, layout)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(t) for n, t in params.items()})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    fmt.export_adapter(str(tmp))
    tmp.replace(out_file)
    return out_file.stat().st_size
