"""The one error gradex raises for what the user can fix: the CLI prints it in one line and exits 2."""


class ConfigError(ValueError):
    """A problem with the user's config or data, raised before any expensive stage runs."""
