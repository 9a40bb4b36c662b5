"""Exporters (ONNX, OpenVINO, TensorRT) and the runners that execute what they produce.

Importing the package registers every built-in runtime with ``exporters.runtime.open_runner``.
"""

from exporters import onnx, openvino, tensorrt  # noqa: F401  (register their runtimes)
