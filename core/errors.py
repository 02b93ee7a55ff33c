"""User-facing errors. Each message says what to fix; the CLI and the GUI print it as one line."""


class FlatQuantError(Exception):
    """Base class for errors caused by input the user can correct."""


class ConfigError(FlatQuantError):
    """Malformed quantization config (unknown key, wrong type, unsupported bits, bad skip_layers)."""


class ModelLoadError(FlatQuantError):
    """The model path is missing or does not hold a loadable model."""


class UnsupportedModelError(FlatQuantError):
    """The model's architecture is not one FlatQuant Studio knows how to transform."""


class DataError(FlatQuantError):
    """Calibration or evaluation data is missing or unreadable."""


class MatrixFileError(FlatQuantError):
    """A flat_matrices.pth file is corrupt, unsafe, or belongs to another model."""


class ExportError(FlatQuantError):
    """An export cannot be written as asked (target folder, disk full, a config the target format cannot hold)."""


class CalibrationError(FlatQuantError):
    """Calibration diverged (NaN/inf loss) or ran out of memory."""


class JobCancelled(FlatQuantError):
    """The job was cancelled through its CancelToken."""


class OutputError(FlatQuantError):
    """The output folder is a file, not writable, or full; the message says what was kept and how to go on."""
