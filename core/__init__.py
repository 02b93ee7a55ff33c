"""FlatQuant Studio engine: FlatQuant W4A4 calibration, folding, evaluation and real-quant conversion."""
