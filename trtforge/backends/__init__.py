"""Engine backends, registered by name on import; targets name them in the spec."""

from trtforge.backends import onnxruntime, tensorrt  # noqa: F401
