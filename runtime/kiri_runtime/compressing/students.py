"""The default student of a distilled variant whose source has no PyTorch module to copy (an ONNX file).

Documented in the API (`studentWidth`, `studentDepth`) and in docs/manifest.md, "Distillation".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kiri_runtime.compressing.errors import CompressionError

if TYPE_CHECKING:
    import torch

DEFAULT_STUDENT_WIDTH = 64
DEFAULT_STUDENT_DEPTH = 2


def mlp_student(
    inputs: list[np.ndarray[Any, Any]], outputs: list[np.ndarray[Any, Any]], *, width: int, depth: int
) -> torch.nn.Module:
    """The default student, sized from one batch of the teacher's inputs and outputs."""
    from torch import nn

    if len(inputs) != 1 or not np.issubdtype(inputs[0].dtype, np.floating):
        raise CompressionError(
            "distilled: the default student (an MLP) takes one float input, and this model takes "
            f"{', '.join(str(a.dtype) for a in inputs)}; give options.student (a factory)"
        )
    in_features = int(np.prod(inputs[0].shape[1:]))
    out_shapes = [tuple(int(d) for d in o.shape[1:]) for o in outputs]

    class MlpStudent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            size = in_features
            for _ in range(depth):
                layers += [nn.Linear(size, width), nn.ReLU()]
                size = width
            self.body = nn.Sequential(*layers)
            self.heads = nn.ModuleList(nn.Linear(size, max(1, int(np.prod(s)))) for s in out_shapes)

        # One named argument, not *args: torch.export matches dynamic shapes to the signature.
        def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
            h = self.body(x.flatten(1))
            outs = tuple(head(h).reshape(-1, *s) for head, s in zip(self.heads, out_shapes, strict=True))
            return outs[0] if len(outs) == 1 else outs

    return MlpStudent()
