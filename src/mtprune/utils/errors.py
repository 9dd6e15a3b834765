"""The one exception type that means "the user's input is wrong" (CLI exit code 2)."""


class MTPruneInputError(ValueError):
    """Bad input: a config, a data file, a model or an argument. The message names the problem."""
