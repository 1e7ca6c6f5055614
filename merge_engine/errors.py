"""Errors a user can cause. The CLIs print their message as one line and exit with code 2."""


class MergeError(Exception):
    """Base class of every error caused by the user's input (config, models, options)."""


class ConfigError(MergeError):
    """The recipe is malformed: the message names the file and the key path."""


class ModelError(MergeError):
    """An input model is missing, unreadable, or does not fit the recipe (tensor, shape, layers)."""
