"""meshllm: one Llama-family model across the weak devices of a LAN, by tensor parallelism."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ConfigError,
    DownloadError,
    MeshError,
    MissingTensorError,
    ModelError,
    ModelFileError,
    PromptTooLongError,
    RequestError,
    TokenizerError,
    UnsupportedModelError,
)
from .generation.loop import Result  # noqa: E402
from .generation.sampling import SamplingParams  # noqa: E402
from .runtime.local import LocalEngine  # noqa: E402

__all__ = [
    "__version__",
    "LocalEngine",
    "Result",
    "SamplingParams",
    "MeshError",
    "ModelError",
    "ModelFileError",
    "ConfigError",
    "UnsupportedModelError",
    "MissingTensorError",
    "TokenizerError",
    "RequestError",
    "PromptTooLongError",
    "DownloadError",
]
