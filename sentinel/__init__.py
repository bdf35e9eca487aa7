"""sentinel: a self-healing SRE daemon for locally served LLM inference."""

__version__ = "0.1.0"
