"""The exceptions meshllm raises. Every one names the problem and, where there is one, the fix.

MeshError
 ├── ModelError                 a model folder or file cannot be used
 │    ├── ModelFileError        a file is missing or unreadable (named)
 │    ├── ConfigError           config.json (or GGUF metadata) is missing a key or malformed
 │    ├── UnsupportedModelError the architecture or a feature of it is not supported
 │    └── MissingTensorError    a tensor the model needs is absent from the checkpoint (named)
 ├── TokenizerError             no usable tokenizer, or a chat template that fails
 ├── RequestError               a request that cannot run as asked
 │    └── PromptTooLongError    prompt (+ max tokens) exceeds the model's context
 ├── DownloadError              the embedded default model could not be fetched
 ├── PlanError                  no split of the model fits these devices (says why)
 └── LinkError                  a link to a peer failed
      ├── ProtocolError         the peer sent bytes that are not our protocol (the link is closed)
      │    └── IntegrityError   a sealed frame failed to open: altered, replayed or reordered on the way
      ├── HandshakeError        the peer was refused, or refused us
      │    ├── AuthenticationError   a different mesh secret
      │    └── VersionMismatchError  a different protocol version
      ├── DeviceLostError       a device closed its link or died (named)
      ├── MeshTimeoutError      a peer did not answer within the configured seconds (phase named)
      └── RemoteError           a peer reported an error of its own (its message is carried)
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error meshllm raises on purpose."""


class ModelError(MeshError):
    """A model folder or file cannot be used."""


class ModelFileError(ModelError):
    """A model file is missing or unreadable."""


class ConfigError(ModelError):
    """The model configuration is missing a key or malformed."""


class UnsupportedModelError(ModelError):
    """The architecture, or a feature of it, is not supported."""


class MissingTensorError(ModelError):
    """A tensor the model needs is not in the checkpoint."""


class TokenizerError(MeshError):
    """No usable tokenizer, or a chat template that cannot render."""


class RequestError(MeshError):
    """A generation request that cannot run as asked."""


class PromptTooLongError(RequestError):
    """The prompt, plus the tokens asked for, does not fit the context."""


class DownloadError(MeshError):
    """The embedded default model could not be fetched."""


class PlanError(MeshError):
    """No split of the model fits these devices."""


class LinkError(MeshError):
    """A link to a peer failed."""


class ProtocolError(LinkError):
    """The peer sent bytes that are not our protocol."""


class IntegrityError(ProtocolError):
    """A sealed frame failed to open: it was altered, replayed, reordered or dropped on the way."""


class HandshakeError(LinkError):
    """The peer was refused, or refused us."""


class AuthenticationError(HandshakeError):
    """The peer holds a different mesh secret."""


class VersionMismatchError(HandshakeError):
    """The peer speaks a different protocol version."""


class DeviceLostError(LinkError):
    """A device closed its link or died."""


class MeshTimeoutError(LinkError):
    """A peer did not answer in time."""


class RemoteError(LinkError):
    """A peer reported an error of its own."""
