"""A tiny causal language model that the tests build and train themselves: never downloaded.

`tiny_llama(cache)` is a real Hugging Face checkpoint directory of a `LlamaForCausalLM` (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json with a chat template). Its
tokenizer is a byte-level BPE (HF `tokenizers`) trained on Python standard library sources, and the model is
trained briefly on the same text (plus chat turns made from the stdlib's docstrings), so its next-token
distributions are peaked like a real LM's and quantization error shows up in KL and top-1 the way it does on a
real one. Every MatMul's K is a multiple of 32 and every N a multiple of 64 (int4 MatMulNBits, block 32).

`tiny_gguf(hf_dir, out, qtype)` writes that model as a GGUF in llama.cpp's layout (what `convert_hf_to_gguf.py`
writes for LLaMA): arch "llama", llama.cpp tensor names, q/k rows permuted for llama.cpp's rotary, the tokenizer as
`tokenizer.ggml.model = "gpt2"` with tokens, token types, merges, special ids and the chat template. Weights are
quantized to `qtype` (norms stay F32). gguf-py 0.19 quantizes F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 but
no K-quant; Q4_K and Q6_K are packed here (round-to-nearest scales, checked against gguf-py's dequantizer). A
K-quant needs rows of 256: a tensor whose row (K) is not a multiple of 256 falls back the way llama.cpp's
quantizer does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). With hidden 128 and intermediate 256 only
`ffn_down` is a K-quant; `types=` overrides the type per tensor name.

Both are cached under `${KIRI_CACHE:-~/.cache/kiri}/lm-fixture/<hash>/`, the hash covering this file's source,
the parameters and the training text (built in a temporary directory, then renamed: atomic).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import shutil
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The training text: stdlib modules, a fixed list (the hash covers their bytes, so another Python rebuilds). Six
# modules (52k tokens, ~10 passes in 300 steps) train to a loss near 2.3 and a mean top-1 probability near 0.3 on
# this text; the whole stdlib list of twenty stayed near 3.6 (flat distributions) in the same time.
CORPUS_MODULES = ("textwrap.py", "string.py", "functools.py", "fnmatch.py", "glob.py", "heapq.py")

PAD, BOS, EOS = "<|pad|>", "<|endoftext|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, "<|im_start|>")  # ids 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PARAMS: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "seed": 20,
    "steps": 300,
    "batch": 16,
    "seq": 128,
    "lr": 5e-3,
}

# A smaller model of the same family, tokenizer and text (tiny_llama(smaller=True)): on held-out source its
# next-token accuracy is ~60 % of the base model's (8.6 % vs 14.4 % over 2,000 positions), so the two separate where
# the base model and its own int4 build do not (14.5 % vs 14.4 %).
SMALLER: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def cache_root() -> Path:
    return Path(os.environ.get("KIRI_CACHE", str(Path.home() / ".cache" / "kiri"))) / "lm-fixture"


def _stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / name).read_text(encoding="utf-8") for name in CORPUS_MODULES]


def _chat_pairs(texts: list[str]) -> list[tuple[str, str]]:
    """(question, answer) turns from the stdlib: 'What does def f(a, b) do?' -> the docstring's first line."""
    pairs = []
    for text in texts:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    kind = "class" if isinstance(node, ast.ClassDef) else "def"
                    pairs.append((f"What does {kind} {node.name} do?", doc.strip().splitlines()[0]))
    return pairs


def _render_chat(user: str, answer: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def _digest(params: Mapping[str, Any], texts: list[str], extra: str = "") -> str:
    """The model's cache key: the code that builds it (not the GGUF writer's), its parameters, its text."""
    h = hashlib.sha256()
    for fn in (_train_tokenizer, _build_llama, _fix_tokenizer_config, _chat_pairs, _render_chat):
        h.update(ast.dump(ast.parse(textwrap.dedent(inspect.getsource(fn)))).encode())  # not its formatting
    h.update(json.dumps([CORPUS_MODULES, SPECIAL_TOKENS, CHAT_TEMPLATE], sort_keys=True).encode())
    h.update(json.dumps(dict(params), sort_keys=True).encode())
    for text in texts:
        h.update(hashlib.sha256(text.encode()).digest())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def _atomic_build(dest: Path, build: Any) -> Path:
    """Build into a temporary sibling and rename it to `dest` (another process may win the race: fine)."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level split: what transformers' GGUF loader rebuilds for `tokenizer.ggml.model = "gpt2"`.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _build_llama(out: Path, params: Mapping[str, Any], tied: bool, texts: list[str]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chats = [_render_chat(q, a) for q, a in _chat_pairs(texts)]
    tok = _train_tokenizer([*texts, *chats], params["vocab_size"])
    assert tok.get_vocab_size() == params["vocab_size"], tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert [ids[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3], ids

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    _fix_tokenizer_config(out)

    # The training stream: each stdlib file ends with <|endoftext|>; chat turns end with <|im_end|>.
    stream: list[int] = []
    for text in texts:
        stream += [*tok.encode(text).ids, ids[BOS]]
    rng = np.random.default_rng(params["seed"])
    for i in rng.permutation(len(chats)):
        stream += tok.encode(chats[i]).ids
    data = torch.tensor(stream, dtype=torch.long)

    torch.manual_seed(params["seed"])
    config = LlamaConfig(
        vocab_size=params["vocab_size"],
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate_size"],
        num_hidden_layers=params["num_hidden_layers"],
        num_attention_heads=params["num_attention_heads"],
        num_key_value_heads=params["num_key_value_heads"],
        max_position_embeddings=params["max_position_embeddings"],
        rope_theta=params["rope_theta"],
        rms_norm_eps=params["rms_norm_eps"],
        tie_word_embeddings=tied,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        attn_implementation="eager",
    )
    # Eager attention: on CPU it trains this model many times faster than SDPA (measured); the saved config
    # does not keep the choice.
    model = LlamaForCausalLM(config)
    model.train()
    steps, batch, seq = params["steps"], params["batch"], params["seq"]
    opt = torch.optim.AdamW(model.parameters(), lr=params["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params["lr"], total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(params["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic sums, and the machine's other users keep their core
    losses: list[float] = []
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
            x = torch.stack([data[s : s + seq] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            losses.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD]).save_pretrained(out)
    (out / "fixture.json").write_text(
        json.dumps({"final_loss": sum(losses[-20:]) / 20, **dict(params)}, indent=1) + "\n"
    )


def _fix_tokenizer_config(out: Path) -> None:
    """A tokenizer_config.json every reader agrees on (transformers, onnxruntime-genai's tokenizer)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(
        {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": 512,
        }
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def tiny_llama(cache: Path | None = None, *, tied: bool = False, smaller: bool = False) -> Path:
    """The HF directory of the trained tiny LlamaForCausalLM (built once per content hash, then reused).
    `smaller`: the SMALLER shape (one layer, hidden 64), same tokenizer and training text: a genuinely weaker
    model that can draft for or be cascaded with the base one (bench/collab)."""
    texts = _stdlib_texts()
    shape = {**PARAMS, **(SMALLER if smaller else {})}
    params = {**shape, "tied": tied}
    root = cache if cache is not None else cache_root()
    dest = root / f"llama-{'small-' if smaller else ''}{'tied-' if tied else ''}{_digest(params, texts)}"
    return _atomic_build(dest, lambda tmp: _build_llama(tmp, shape, tied, texts))


def tiny_genai(cache: Path | None = None, precision: str = "fp32", *, smaller: bool = False) -> Path:
    """The tiny LLaMA as an onnxruntime-genai model directory (what `kiri serve` serves): fp32, or `int4` (the edge
    variant `kiri compress` builds by default), built once per checkpoint with the model builder (about 10 s) and
    cached next to it. `smaller`: of the SMALLER model (tiny_llama)."""
    from kiri_runtime.compressing.lm.building import build

    hf_dir = tiny_llama(cache, smaller=smaller)
    dest = hf_dir.parent / f"genai-{precision}-{hf_dir.name}"

    def make(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="kiri-builder-cache-") as builder_cache:
            build(hf_dir, tmp, precision, {}, Path(builder_cache))  # type: ignore[arg-type]

    return _atomic_build(dest, make)


# --- GGUF -------------------------------------------------------------------------------------------------------

QK_K = 256
K_QUANT_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}
GGUF_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_to_gguf_name(name: str) -> str | None:
    table = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in table:
        return table[name]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    layer, rest = parts[2], ".".join(parts[3:])
    sub = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }.get(rest)
    return f"blk.{layer}.{sub}" if sub else None


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], 2)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """block_q4_K (d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles) per 256 weights: w = d*sc*q - dmin*m."""
    n_rows, _k = rows.shape
    blocks = rows.reshape(-1, 8, 32).astype(np.float32)  # [nb, sub, 32]
    lo = np.minimum(blocks.min(axis=-1), 0.0)  # the sub-block's offset (<= 0), stored as min m >= 0
    hi = blocks.max(axis=-1)
    scale = (hi - lo) / 15.0
    mins = -lo
    d = scale.max(axis=-1) / 63.0
    dmin = mins.max(axis=-1) / 63.0
    d16 = d.astype(np.float16).astype(np.float32)
    dmin16 = dmin.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16[:, None] > 0, np.rint(scale / d16[:, None]), 0).clip(0, 63).astype(np.uint8)
        mq = np.where(dmin16[:, None] > 0, np.rint(mins / dmin16[:, None]), 0).clip(0, 63).astype(np.uint8)
        eff_scale = d16[:, None] * sc
        eff_min = dmin16[:, None] * mq
        q = np.where(
            eff_scale[..., None] > 0, np.rint((blocks + eff_min[..., None]) / eff_scale[..., None]), 0
        )
    q = q.clip(0, 15).astype(np.uint8)  # [nb, 8, 32]
    packed = np.zeros((blocks.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (mq[:, 0:4] & 63) | ((mq[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mq[:, 4:8] & 0xF) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # 64 weights per chunk: low nibble = first 32, high nibble = next 32
    qs = (pairs[:, :, 0, :] | (pairs[:, :, 1, :] << 4)).reshape(-1, 128)
    out = np.concatenate([_fp16(d[:, None]), _fp16(dmin[:, None]), packed, qs], axis=1)
    return out.reshape(n_rows, -1)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """block_q6_K (128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, d) per 256 weights: w = d*sc*(q-32)."""
    n_rows, _k = rows.shape
    blocks = rows.reshape(-1, 16, 16).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1)
    scale = amax / 31.0
    d = scale.max(axis=-1) / 127.0
    d16 = d.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16[:, None] > 0, np.rint(scale / d16[:, None]), 0).clip(-128, 127).astype(np.int8)
        eff = d16[:, None] * sc.astype(np.float32)
        q = np.where(eff[..., None] != 0, np.rint(blocks / eff[..., None]), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [nb, half(128), quarter(32), l]
    ql = np.zeros((q.shape[0], 2, 64), dtype=np.uint8)
    qh = np.zeros((q.shape[0], 2, 32), dtype=np.uint8)
    ql[:, :, 0:32] = (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4)
    ql[:, :, 32:64] = (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)
    qh[:, :, :] = (
        (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    )
    out = np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8).reshape(-1, 16), _fp16(d[:, None])],
        axis=1,
    )
    return out.reshape(n_rows, -1)


IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)


def quantize_iq4_nl(rows: np.ndarray) -> np.ndarray:
    """block_iq4_nl (d, 16 bytes of 4-bit indices into a fixed non-linear table) per 32 weights: a type Kiri refuses."""
    n_rows, _ = rows.shape
    blocks = rows.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1) / 127.0
    d16 = d.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(d16[:, None] > 0, blocks / d16[:, None], 0)
    idx = np.abs(x[..., None] - IQ4_NL_VALUES).argmin(axis=-1).astype(np.uint8)
    qs = idx[:, :16] | (idx[:, 16:] << 4)
    return np.concatenate([_fp16(d[:, None]), qs], axis=1).reshape(n_rows, -1)


def _quantize(w: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    t = GGMLQuantizationType[qtype]
    if qtype == "F32":
        return w.astype(np.float32), t
    if qtype == "F16":
        return w.astype(np.float16), t
    if qtype == "Q4_K":
        return quantize_q4_k(w), t
    if qtype == "Q6_K":
        return quantize_q6_k(w), t
    if qtype == "IQ4_NL":
        return quantize_iq4_nl(w), t
    return quantize(w.astype(np.float32), t), t


def _tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str, types: Mapping[str, str]) -> str:
    if gguf_name in types:
        return types[gguf_name]
    if len(shape) == 1:
        return "F32"  # norms
    if qtype in K_QUANT_FALLBACK and shape[-1] % QK_K:
        return K_QUANT_FALLBACK[qtype]
    return qtype


def _write_gguf(hf_dir: Path, path: Path, qtype: str, types: Mapping[str, str]) -> None:
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))

    w = gguf.GGUFWriter(str(path), "llama")
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // n_head
    w.add_name("kiri-tiny-llama")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(_file_type(qtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    tokens = [""] * config["vocab_size"]
    for text, i in {**vocab, **added}.items():
        tokens[i] = text
    special = {a["id"] for a in tok["added_tokens"] if a.get("special")}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(
        [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    )
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(added[tok_config["bos_token"]])
    w.add_eos_token_id(added[tok_config["eos_token"]])
    w.add_pad_token_id(added[tok_config["pad_token"]])
    w.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    w.add_chat_template(tok_config["chat_template"])

    for name in sorted(tensors, key=_tensor_order):
        gname = _hf_to_gguf_name(name)
        if gname is None:
            continue
        data = tensors[name].astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = _permute(data, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, n_head, n_kv)
        ttype = _tensor_type(gname, data.shape, qtype, types)
        q, raw = _quantize(data, ttype)
        if ttype in ("F32", "F16"):
            w.add_tensor(gname, q)
        else:
            w.add_tensor(gname, q, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tensor_order(name: str) -> tuple[int, int, str]:
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (2, 0, name)


def _file_type(qtype: str) -> int:
    from gguf import LlamaFileType

    return int(
        {
            "F32": LlamaFileType.ALL_F32,
            "F16": LlamaFileType.MOSTLY_F16,
            "BF16": LlamaFileType.MOSTLY_BF16,
            "Q8_0": LlamaFileType.MOSTLY_Q8_0,
            "Q4_0": LlamaFileType.MOSTLY_Q4_0,
            "Q4_1": LlamaFileType.MOSTLY_Q4_1,
            "Q5_0": LlamaFileType.MOSTLY_Q5_0,
            "Q5_1": LlamaFileType.MOSTLY_Q5_1,
            "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
            "Q6_K": LlamaFileType.MOSTLY_Q6_K,
        }.get(qtype, LlamaFileType.GUESSED)
    )


def tiny_gguf(hf_dir: Path, out: Path, qtype: str = "F32", *, types: Mapping[str, str] | None = None) -> Path:
    """`hf_dir` written as a llama.cpp GGUF with weights as `qtype` (one of GGUF_QTYPES), norms F32.

    `out` is the file to write, or a directory: then `<out>/model-<qtype>.gguf`. `types` sets the type of single
    tensors by GGUF name (e.g. {"output.weight": "Q6_K"}). Cached: an existing file is kept when its sidecar
    `<file>.key` says it was made from the same checkpoint, code and types.
    """
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"qtype {qtype!r}: choose one of {', '.join(GGUF_QTYPES)}")
    types = dict(types or {})
    path = out / f"model-{qtype}.gguf" if out.suffix != ".gguf" else out
    key = hashlib.sha256(
        Path(__file__).read_bytes()
        + (hf_dir / "model.safetensors").read_bytes()
        + (hf_dir / "tokenizer.json").read_bytes()
        + json.dumps([qtype, sorted(types.items())]).encode()
    ).hexdigest()
    sidecar = path.with_name(path.name + ".key")
    if path.exists() and sidecar.exists() and sidecar.read_text() == key:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_gguf(hf_dir, tmp, qtype, types)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar.write_text(key)
    return path


def raw_greedy(model: Any, prompt_ids: list[int], n: int) -> list[int]:
    """A plain onnxruntime-genai greedy loop of at most `n` tokens after `prompt_ids`, the reference a server must
    match token for token; `model` is an `og.Model` or its directory."""
    import onnxruntime_genai as og

    if not isinstance(model, og.Model):
        model = og.Model(str(model))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    out: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@dataclass(frozen=True)
class GreedyChat:
    """A chat question and the model's greedy answer to it, by a plain onnxruntime-genai loop."""

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    answer_ids: list[int]
    """The answer's tokens, the closing <|im_end|> included."""
    text: str
    """The answer's text, without <|im_end|>."""


def greedy_chat(genai_dir: Path, max_tokens: int = 30, min_tokens: int = 6) -> GreedyChat:
    """The first chat question of the training turns (`What does def dedent do?` first) whose greedy answer
    ends with <|im_end|> within `max_tokens` and has at least `min_tokens` before it.

    The tests that need an answer that stops take it from here instead of assuming which question the weights
    answer that way: the model is trained on the machine that runs the tests, and training on another CPU
    (its kernels round differently) gives other weights, so other answers."""
    import onnxruntime_genai as og

    model = og.Model(str(genai_dir))
    tok = og.Tokenizer(model)
    end = SPECIAL_TOKENS.index(EOS)
    questions = ["What does def dedent do?", *(q for q, _ in _chat_pairs(_stdlib_texts()))]
    for question in dict.fromkeys(questions):
        messages = [{"role": "user", "content": question}]
        prompt = tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        ids = [int(t) for t in tok.encode(prompt)]
        answer = raw_greedy(model, ids, max_tokens)
        if answer and answer[-1] == end and len(answer) > min_tokens:
            text = tok.decode(np.asarray(answer[:-1], dtype=np.int32))
            return GreedyChat(messages, ids, answer, text)
    raise AssertionError(
        f"no training question of {genai_dir} has a greedy answer that ends within {max_tokens}"
    )


if __name__ == "__main__":  # python tests/lm_fixture.py [cache]: build and time it
    import sys

    t0 = time.monotonic()
    d = tiny_llama(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(d, f"{time.monotonic() - t0:.1f}s", (d / "fixture.json").read_text())
