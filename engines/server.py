"""`aptp serve`'s HTTP process, kept importable under its documented name: the code is in engines.serving
(protocol: request parsing and response bodies; routes: the one set of handlers; http: the local process)."""

from .serving.http import create_app, serve  # noqa: F401

__all__ = ["create_app", "serve"]
