"""Check before training that the model exports to ONNX and runs the same in onnxruntime."""
from __future__ import annotations

import inspect
import io
import logging
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..modules import unwrap_model
from ..rng import preserved_rng
from .base import Callback, PhaseContext, Priority

__all__ = ["ModelConversionCheckCallback"]

logger = logging.getLogger("super_trainer")

INSTALL_HINT = "pip install 'super-trainer[onnx]' (or: pip install onnx onnxruntime)"


def _require_onnx() -> Any:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"ModelConversionCheckCallback needs the optional packages onnx and onnxruntime "
                          f"({err}); install them with: {INSTALL_HINT}") from None
    return onnxruntime


class ModelConversionCheckCallback(Callback):
    """At on_training_start, exports the model to ONNX and checks that onnxruntime's output equals
    torch's within ``rtol`` / ``atol`` (as ``numpy.allclose``), so a model that will not deploy fails
    before hours of training, not after.

    The signature is SuperGradients' (``model_name``, ``input_dimensions``, ``primary_batch_size``, and
    ``torch.onnx.export`` keywords such as ``opset_version``, ``do_constant_folding``, ``dynamic_axes``,
    ``input_names``, ``output_names`` passed through), so SG recipes carry over:

    - ``model_name``: only names the model in messages.
    - ``input_dimensions``: the input shape without the batch dimension, e.g. ``(3, 224, 224)``; default:
      the shape of the first sample of ``train_loader.dataset`` (read with the RNG state saved and restored,
      so training draws the same random numbers as without this callback).
    - ``primary_batch_size`` (1), ``opset_version`` (None: torch's default).
    - ``raise_on_mismatch`` (True): a mismatch or a failed export raises RuntimeError; False only warns.
    The check runs in eval mode on a copy-free export (the model's mode is restored), with a random input
    from a private generator. ``max_abs_diff`` holds the result. Needs the ``[onnx]`` extra: without it,
    constructing the callback raises ImportError saying how to install it.
    """

    priority = Priority.VERY_LOW  # after callbacks that change the model at on_training_start

    def __init__(self, model_name: Optional[str] = None, input_dimensions: Optional[Sequence[int]] = None,
                 primary_batch_size: int = 1, rtol: float = 1e-3, atol: float = 1e-5,
                 opset_version: Optional[int] = None, raise_on_mismatch: bool = True, **export_kwargs: Any) -> None:
        self._ort = _require_onnx()
        self.model_name = model_name
        self.input_dimensions = tuple(int(d) for d in input_dimensions) if input_dimensions is not None else None
        self.batch_size = int(primary_batch_size)
        self.export_kwargs = {"input_names": ["input"], **export_kwargs}
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.opset_version = opset_version
        self.raise_on_mismatch = raise_on_mismatch
        self.max_abs_diff: Optional[float] = None

    def _input_shape(self, context: PhaseContext) -> Sequence[int]:
        if self.input_dimensions is not None:
            return self.input_dimensions
        dataset = getattr(context.train_loader, "dataset", None)
        if dataset is None:
            raise ValueError("ModelConversionCheckCallback: train_loader has no dataset to take the input shape "
                             "from; pass input_dimensions=(C, H, W)")
        with preserved_rng():  # a dataset's random augmentation must not shift the run's numbers
            sample = dataset[0]
        first = sample[0] if isinstance(sample, (tuple, list)) else sample
        return tuple(torch.as_tensor(first).shape)

    def on_training_start(self, context: PhaseContext) -> None:
        net = unwrap_model(context.net)
        shape = (self.batch_size, *self._input_shape(context))
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(shape, generator=generator).to(context.device or "cpu")
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                expected = net(sample)
                buffer = io.BytesIO()
                kwargs: dict = dict(self.export_kwargs)
                if self.opset_version:
                    kwargs["opset_version"] = self.opset_version
                if "dynamo" in inspect.signature(torch.onnx.export).parameters:
                    kwargs["dynamo"] = False  # the TorchScript exporter needs no extra package (onnxscript)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(net, (sample,), buffer, **kwargs)
            session = self._ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
            outputs = session.run(None, {session.get_inputs()[0].name: sample.cpu().numpy()})
        except Exception as err:  # noqa: BLE001 - any export/runtime failure is the finding
            self._fail(f"ModelConversionCheckCallback{self._name}: ONNX export or onnxruntime failed: "
                       f"{type(err).__name__}: {err}")
            return
        finally:
            net.train(was_training)
        if isinstance(expected, torch.Tensor):
            torch_outputs = [expected]
        elif isinstance(expected, dict):  # the exporter flattens a dict's values in order
            torch_outputs = list(expected.values())
        else:
            torch_outputs = list(expected)
        if len(torch_outputs) != len(outputs):
            self._fail(f"ModelConversionCheckCallback{self._name}: torch gave {len(torch_outputs)} outputs, "
                       f"onnxruntime {len(outputs)}")
            return
        diffs = [0.0]
        for index, (ours, theirs) in enumerate(zip(torch_outputs, outputs)):
            ours_np = ours.detach().float().cpu().numpy()
            if ours_np.shape != theirs.shape:
                self._fail(f"ModelConversionCheckCallback{self._name}: output {index} has shape {theirs.shape} in "
                           f"onnxruntime, {ours_np.shape} in torch")
                return
            diffs.append(float(np.max(np.abs(ours_np - theirs))) if ours_np.size else 0.0)
            if not np.allclose(theirs, ours_np, rtol=self.rtol, atol=self.atol):
                self.max_abs_diff = max(diffs)
                self._fail(f"ModelConversionCheckCallback{self._name}: onnxruntime output differs from torch's "
                           f"beyond rtol={self.rtol}, atol={self.atol} (max abs diff {self.max_abs_diff:.3g})")
                return
        self.max_abs_diff = max(diffs)
        logger.info("ModelConversionCheckCallback: ONNX output matches torch (max abs diff %.3g)", self.max_abs_diff)
        if context.sg_logger is not None and hasattr(context.sg_logger, "add_text"):
            context.sg_logger.add_text("ModelConversionCheck", f"ONNX export OK, max abs diff {self.max_abs_diff:.3g}")

    @property
    def _name(self) -> str:
        return f" ({self.model_name})" if self.model_name else ""

    def _fail(self, message: str) -> None:
        if self.raise_on_mismatch:
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=3)
