"""glmkit: run, serve and train GLM-family models (ChatGLM-6B/2/3, GLM-4, GLM-4-0414) and Llama-style
models from Python, without executing code that ships with a checkpoint.

Torch-using names (`load`, `LLM`) are imported on first use, so `import glmkit.config` stays light.
"""

from glmkit.config import ModelConfig
from glmkit.errors import CheckpointError, ConfigError, GlmkitError, UnsupportedArchitectureError

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "load", "GlmkitError", "ConfigError", "CheckpointError",
           "UnsupportedArchitectureError", "__version__"]


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"load", "LLM"})


def __getattr__(name: str):
    if name in ("load", "LLM"):
        from glmkit import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'glmkit' has no attribute {name!r}")
