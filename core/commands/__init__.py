"""One module per CLI command; each defines register(subparsers)."""
COMMANDS = ("quantize", "evaluate", "export")
