"""The errors gradex raises for what the user can fix: the CLI prints one in one line and exits 2."""


class ConfigError(ValueError):
    """A problem with the user's config or data, raised before any expensive stage runs."""


class AssetError(ConfigError):
    """A real component gradex fetches from the package index (the embedded model, BIG-bench's tasks)
    cannot be had on this machine: the index lacks it or cannot be reached. The message says how to
    supply it instead. A ConfigError, so it is said in one line before anything is trained."""
