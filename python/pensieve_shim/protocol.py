"""The exceptions the Rust side tells apart (src/engine/py.rs matches them by class)."""

class ModelLoadError(Exception):
    """Raised when --model does not name a loadable model."""


class InvalidPrompt(Exception):
    """The request cannot run as asked (e.g. the prompt leaves no room in the context): a client error."""

