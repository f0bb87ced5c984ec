"""glmkit's exceptions: one short sentence naming what was wrong and what to do, and `read_utf8`, the one way
glmkit reads a text file a user handed it (so a binary or Latin-1 file is a clear error, never a traceback).

Nothing here imports torch; every layer of glmkit raises these instead of leaking deep tracebacks.
"""

from __future__ import annotations

from pathlib import Path


class GlmkitError(Exception):
    """Base class of every error glmkit raises on purpose."""


class ConfigError(GlmkitError, ValueError):
    """A model configuration is invalid or uses something glmkit does not understand."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture is not one glmkit implements."""


class CheckpointError(GlmkitError):
    """A checkpoint directory or weight file is missing, truncated, corrupt or does not fit the model."""


def read_utf8(path: str | Path, what: str = "file") -> str:
    """The text of a UTF-8 file, or a GlmkitError naming the file and the byte that is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GlmkitError(f"{what} {path} is not UTF-8 text (byte {e.start} cannot be decoded); convert it, e.g. "
                          "with iconv.") from None
    except OSError as e:
        raise GlmkitError(f"{what} {path} cannot be read ({e.strerror}).") from None
