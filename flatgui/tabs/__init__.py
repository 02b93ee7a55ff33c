"""One module per tab; each has build(ctx) (components) and wire(ctx) (events)."""
