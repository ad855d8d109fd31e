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
 └── DownloadError              the embedded default model could not be fetched
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
