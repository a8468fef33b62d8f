"""Errors raised by the runtime. Each message names the file, key or prompt that is wrong.

`UserError` means "the user asked for something wrong" anywhere in the toolchain: the `aptp`
command prints its message on one line and exits with status 2; anything else is a bug and keeps
its traceback. It lives here, at the bottom of the package stack, so every layer can raise it and
the torch-free verbs can catch it without importing torch.

`EngineError` is the base class of the runtime's refusals; callers that only want "the runtime
refused" catch it. The subclasses say which layer refused, so a server can map them to status codes.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a path, a value, a file. The message says which and why."""


class EngineError(UserError):
    """The runtime cannot do what was asked; the message says what and, where relevant, which file."""


class ManifestError(EngineError):
    """manifest.json is missing, unreadable, of an unknown format version or inconsistent."""


class IntegrityError(EngineError):
    """A file listed in the manifest is missing, truncated or does not match its recorded sha256."""


class PromptError(EngineError, ValueError):
    """A prompt (or the list of prompts) cannot be used: empty, not a string, ..."""


class ParamError(EngineError, ValueError):
    """A generation parameter (steps, guidance_scale, seed, ...) is out of range or of the wrong type.
    `param` names the request field, so a server answers with it (OpenAI's `error.param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class BackendError(EngineError):
    """An inference backend is unavailable (missing package, no GPU) or failed to open a model."""


class SchedulerConfigError(EngineError, ValueError):
    """A scheduler config asks for something these numpy schedulers do not implement, or is invalid."""


class UnavailableError(EngineError):
    """The server cannot take work now (not ready, draining, queue full); retry after `retry_after_s`."""

    def __init__(self, message: str, reason: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeadlineExceededError(EngineError):
    """A request's deadline passed before its images were done; its work was dropped."""


class RequestCancelledError(EngineError):
    """A request was cancelled (client disconnected, server shut down); its work was dropped."""
