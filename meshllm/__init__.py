"""meshllm: one Llama-family model across the weak devices of a LAN, by tensor parallelism."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AuthenticationError,
    ConfigError,
    DeviceLostError,
    DownloadError,
    HandshakeError,
    IntegrityError,
    LinkError,
    MeshError,
    MeshTimeoutError,
    MissingTensorError,
    ModelError,
    ModelFileError,
    PlanError,
    PromptTooLongError,
    ProtocolError,
    RemoteError,
    RequestError,
    TokenizerError,
    UnsupportedModelError,
    VersionMismatchError,
)
from .app import Mesh  # noqa: E402
from .generation.loop import Result  # noqa: E402
from .generation.sampling import SamplingParams  # noqa: E402
from .runtime.launcher import LocalCluster  # noqa: E402
from .runtime.local import LocalEngine  # noqa: E402
from .runtime.mesh import MeshEngine  # noqa: E402

__all__ = [
    "__version__",
    "Mesh",
    "LocalEngine",
    "MeshEngine",
    "LocalCluster",
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
    "PlanError",
    "LinkError",
    "IntegrityError",
    "ProtocolError",
    "HandshakeError",
    "AuthenticationError",
    "VersionMismatchError",
    "DeviceLostError",
    "MeshTimeoutError",
    "RemoteError",
]
