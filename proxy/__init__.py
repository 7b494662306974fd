"""memory-proxy: long-term, per-user memory for any OpenAI-compatible chat app."""

__version__ = "0.1.0"
