"""Built-in tasks (data + model) for the app and the examples: ``digits``."""
