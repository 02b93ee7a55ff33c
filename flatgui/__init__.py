"""FlatQuant Studio's Gradio GUI: UI only, every computation is a call into core/."""
