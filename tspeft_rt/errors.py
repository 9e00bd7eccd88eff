"""Errors that the CLI reports as one clear line and a non-zero exit, never as a traceback."""


class TspeftError(Exception):
    """Bad input or a stopped run: the message names the file, key or option and what was expected."""


class ConfigError(TspeftError):
    pass


class DataError(TspeftError):
    pass


class ModelError(TspeftError):
    pass


class CheckpointError(TspeftError):
    pass


class TrainingDiverged(TspeftError):
    pass
