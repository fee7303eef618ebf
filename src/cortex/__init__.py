"""cortex: a few GPU machines as one OpenAI- and Anthropic-compatible LLM service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cortex")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
