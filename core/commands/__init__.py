"""One module per CLI command; each defines register(subparsers)."""
COMMANDS = ("quantize", "evaluate", "export", "doctor")


def job_writes(calibrates: bool) -> list[str]:
    """What a quantize (or evaluate) job writes into its --output_dir; a calibration also writes the matrix files."""
    from ..evaluate import TASK_CONFIG_DIR
    from ..matrices import MATRIX_FILE, RESUME_FILE
    from ..outputs import LOCK_FILE
    from ..pipeline import LOG_FILE
    from ..report import REPORT_NAME

    return [REPORT_NAME, LOG_FILE, LOCK_FILE, TASK_CONFIG_DIR] + ([MATRIX_FILE, RESUME_FILE] if calibrates else [])
