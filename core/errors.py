"""The project's error types. Each is a problem with what the user gave (a config, a file, a folder), reported as
one line that names it; the command-line entry points print it and exit with status 2."""


class UserError(ValueError):
    """Bad input from the user: a one-line message naming the file, key or value at fault."""


class ConfigError(UserError):
    """A configuration problem, reported as one line naming the key and where it came from."""


class ModelFolderError(UserError):
    """A model folder that cannot be used: not a model folder, a damaged file, tensors that do not fit the model,
    or parts (VQGAN, prior, CLIP) that do not fit each other."""
