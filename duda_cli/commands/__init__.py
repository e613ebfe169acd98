"""One module per command; each exposes `register(app)` or a sub-app."""
