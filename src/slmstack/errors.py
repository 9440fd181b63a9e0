"""Errors that carry a message meant for the user: what is wrong, where, and how to fix it.

The CLI prints these without a traceback and exits with status 2.
"""

from __future__ import annotations


class SlmstackError(Exception):
    """Base class for every error slmstack reports to the user."""


class ConfigError(SlmstackError, ValueError):
    """A config file or field is missing, unknown, or of the wrong type."""


class ModelNotFoundError(SlmstackError, FileNotFoundError):
    """A model reference could not be resolved to weights."""


class AdapterMismatchError(SlmstackError, ValueError):
    """A LoRA adapter does not fit the base model it is loaded onto."""


class InputError(SlmstackError, ValueError):
    """User input (a question, a data file line) is empty, malformed or too long."""
