"""Causal language models: `kiri compress --format hf|gguf` into edge variants that prove their fidelity.

The vocabulary, used the same way in every module here:

- **source**: what the user gives: a Hugging Face checkpoint directory (config.json, safetensors, tokenizer, chat
  template) as a directory or a tar of it (file://, http(s)://, s3://), or a GGUF file. `sources.load_source`
  turns either into an `LmSource`, whose `hf_dir` is always an HF checkpoint directory (a GGUF is dequantised).
- **reference**: the full-precision model the variants are judged against: the source's HF checkpoint run by
  transformers in fp32 (for a GGUF: its dequantised weights, so a GGUF's own rounding is not counted as loss).
- **variant dir**: one built model directory that onnxruntime-genai loads: model.onnx (+ .data), genai_config.json,
  tokenizer files, chat template. Built by the model builder (int4/int8/fp16/fp32), possibly transcoded from a
  GGUF's own quantized blocks.
- **artifact**: a variant dir packed as one deterministic tar through xz (`packing.pack`): one sha256, fetched,
  cached, pinned and resumed by the runtime like any other model file.
"""
