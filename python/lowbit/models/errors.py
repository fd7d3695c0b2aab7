class ModelLoadError(Exception):
    """A model could not be found or loaded; the message says what to change."""
