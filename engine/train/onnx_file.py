"""Writing a module as an ONNX file with torch.onnx's exporter (``ktnas export``, and the latency table's timed
models)."""
from __future__ import annotations

import warnings

import torch

from ktnas.cache.errors import KtnasError

OPSET = 18  # ONNX Resize with antialias (the stem's antialiased bilinear resize) needs opset 18


def write_onnx(module, example: torch.Tensor, out, *, input_name: str = "x", output_name: str = "y",
               dynamic: bool = True) -> None:
    """Write ``module`` (one tensor in, one out) to the ONNX file ``out`` with torch.onnx's exporter; ``dynamic``:
    the batch dimension free (``example``'s batch then at least 2), else fixed at ``example``'s."""
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError:
        raise KtnasError("--format onnx needs the onnx and onnxscript packages: pip install "
                         "'ktnas[export]' (or onnx onnxscript)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(out), dynamo=True, input_names=[input_name],
                          output_names=[output_name],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},) if dynamic else None,
                          opset_version=OPSET, verbose=False)
