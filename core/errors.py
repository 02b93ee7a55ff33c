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


class UsageError(FlatQuantError):
    """The command line itself is malformed (argparse: a bad number, an unknown option, a missing argument)."""


# A user value echoed in a message is cut to ECHO_LIMIT characters, a whole error line to LINE_LIMIT: a hostile
# input (a huge value, a YAML bomb) never floods the terminal or takes seconds to format.
ECHO_LIMIT = 80
LINE_LIMIT = 1000


def shown(value, limit: int = ECHO_LIMIT) -> str:
    """repr() of a user value for a message, bounded in size and time (reprlib stops at a few items per level)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxset, short.maxtuple = 3, 6, 4, 6, 6
    short.maxstring = short.maxother = short.maxlong = limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(message: str, limit: int = LINE_LIMIT) -> str:
    """A message as one line of at most ``limit`` characters; a long one keeps its end (what to fix)."""
    text = " ".join(str(message).splitlines())
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[:limit - tail - 5]} ... {text[-tail:]}"
