"""sdswarm: fine-tune Stable Diffusion together over the internet with hivemind."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sdswarm")
except PackageNotFoundError:  # running from a plain clone (server.py) without installing
    __version__ = "0.1.0"
