"""glmkit's exceptions: one short sentence naming what was wrong and what to do.

Nothing here imports torch; every layer of glmkit raises these instead of leaking deep tracebacks.
"""


class GlmkitError(Exception):
    """Base class of every error glmkit raises on purpose."""


class ConfigError(GlmkitError, ValueError):
    """A model configuration is invalid or uses something glmkit does not understand."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not one glmkit implements."""


class CheckpointError(GlmkitError):
    """A checkpoint directory or weight file is missing, truncated, corrupt or does not fit the model."""
