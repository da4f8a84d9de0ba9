"""The project's own exceptions. Every failure a user can cause raises one of these,
with a message that names the fix."""


class SuiteError(Exception):
    """Base class: catch this to handle any problem the suite reports."""


class ConfigError(SuiteError, ValueError):
    """A parameter value is invalid (unknown ARCH, CAM_METHOD, class name, layer...)."""


class ModelLoadError(SuiteError):
    """The model or its checkpoint could not be loaded."""


class CheckpointError(ModelLoadError):
    """The checkpoint file is missing, corrupt, unsafe or does not fit the architecture."""


class DataError(SuiteError):
    """The dataset is missing, corrupt or incompatible with the model."""


class OutputError(SuiteError):
    """The output folder cannot be written."""


class NumericalError(SuiteError):
    """The model produced NaN/inf values; figures would be misleading."""
