"""Language models: sources, variants built with onnxruntime-genai, their fidelity gates and artifacts."""
