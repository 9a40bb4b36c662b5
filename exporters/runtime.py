"""Runners: one ``(x, t, cond) -> prediction`` interface over PyTorch and ONNX Runtime.

A runner plugs into the sampler as ``denoiser=`` (``compress.diffusion.sampling.sample``), so the
benchmark harness samples and scores an exported model with exactly the loop and metrics it uses for
PyTorch models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import DitCompressError


class TorchRunner:
    """PyTorch eager, or ``torch.compile`` d with ``compile=True``."""

    def __init__(self, model: torch.nn.Module, compile: bool = False):
        from compress.models.adapters import get_adapter

        self.adapter = get_adapter(model)
        self.call = torch.compile(self.adapter.forward) if compile else self.adapter.forward

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.call(x, t, cond)


class OnnxRunner:
    """An exported ``model.onnx`` on ONNX Runtime (CPU, or the CUDA / TensorRT providers where installed)."""

    def __init__(self, export_dir: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        d = Path(export_dir)
        meta_path = d / "export.json"
        if not meta_path.exists():
            raise DitCompressError(f"{d}: not an ONNX export from dit-compress (export.json is missing).")
        self.meta = json.loads(meta_path.read_text())
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(d / "model.onnx"), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.cond_keys = self.meta["inputs"][2:]
        self.provider = self.session.get_providers()[0]  # the one actually used (see ENVIRONMENT notes)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        vals = [x.float(), t, *[cond[k] for k in self.cond_keys]]
        feeds = {n: v.detach().cpu().contiguous().numpy() for n, v in zip(self.names, vals)}
        return torch.from_numpy(self.session.run(None, feeds)[0])
