"""The one family of user errors.

An `EdgellamaError` is bad input or usage: the CLI prints it as one line
`edgellama: error: <message>` and exits 2, with no traceback. Every other exception is a bug
and shows its traceback. `CheckFailed` is a check that ran and failed (parity): exit 1.
"""


class EdgellamaError(Exception):
    """Bad input or usage (exit 2)."""


class SourceError(EdgellamaError):
    """A model source that cannot be read: unknown name, missing or malformed files, pickles."""


class ConfigError(EdgellamaError):
    """A model configuration edgellama cannot represent (architecture, rope type, head counts)."""


class ExportError(EdgellamaError):
    """An export request that cannot be honoured (target/dtype/provider combination, output folder)."""


class QuantError(EdgellamaError):
    """A quantization request that cannot be honoured."""


class ModelFolderError(EdgellamaError):
    """An exported model folder that is missing, incomplete, corrupted or unsafe."""


class RuntimeInputError(EdgellamaError):
    """Bad input at inference time: token ids outside the vocabulary, a prompt past the context."""


class ProviderError(EdgellamaError):
    """An execution provider that is not available here."""


class CheckFailed(Exception):
    """A check ran and failed (exit 1). Not a user error and not a bug."""
