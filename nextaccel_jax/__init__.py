"""nextaccel_jax: next-acceleration-scale prediction for autoregressive MRI reconstruction."""

__version__ = "0.1.0"


class SetupError(Exception):
  """A run set up wrongly: a config field, a path, a missing earlier stage or weights.

  `python -m nextaccel_jax.main` prints these as one line; any other exception is a fault of the
  code and keeps its traceback. Raise one of the two kinds below, which callers can also catch as
  the built-in error they extend.
  """


class ConfigError(SetupError, ValueError):
  """A config value (or a combination of values) that cannot work."""


class MissingInputError(SetupError, FileNotFoundError):
  """A file or folder the run needs is not there (a dataset, a checkpoint, a workdir)."""
