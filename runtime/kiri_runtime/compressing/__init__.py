"""`kiri compress`: export a model to ONNX, verify it, build int8/fp16/distilled variants, gate their fidelity.

Nothing here is imported by the operator. Heavy dependencies (torch, onnx, onnxruntime) are imported inside
functions so that `kiri --help` stays light.
"""
