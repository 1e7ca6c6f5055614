"""Errors a user can cause. The CLIs print their message as one line and exit with code 2."""


class MergeError(Exception):
    """Base class of every error caused by the user's input (config, models, options)."""


class ConfigError(MergeError):
    """The recipe is malformed: the message names the file and the key path."""


class ModelError(MergeError):
    """An input model is missing, unreadable, or does not fit the recipe (tensor, shape, layers)."""


class RunFailure(Exception):
    """A run that cannot finish for a reason outside the user's files (workers that cannot start,
    every candidate failing alike, nothing to export): the CLIs print the message as one line and
    exit with code 1. Work already done is kept."""
