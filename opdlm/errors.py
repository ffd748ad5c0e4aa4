"""The two errors every layer raises: a bad configuration (ConfigError, one line naming where it was
set, the key, the value and the choices) and a plugin that broke its contract while running
(PluginError)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration: one line naming where it was set, the key, the value and the choices.

    ``key`` is the config key the error is about (relative to the plugin that raised it, until a
    caller puts the node's key in front with ``under``; "" when it names a file or nothing),
    ``detail`` the rest, and ``origin`` the file:line or "command line" that set the key (``at``).
    The text is "origin: key: detail". An error raised as one string, "k: must be >= 1", has its
    key read from the text once, here: a first segment without spaces, before ": "."""

    def __init__(self, message: str, *, key: str | None = None, origin: str = "") -> None:
        if key is None:
            head, sep, rest = message.partition(": ")
            key, message = (head, rest) if sep and head and not any(c in head for c in " /=") else ("", message)
        self.key, self.detail, self.origin = key, message, origin
        super().__init__(": ".join(x for x in (origin, key, message) if x))

    def under(self, prefix: str) -> ConfigError:
        """The same error with the node's key in front of its own ("support" + "k" -> "support.k"),
        or, when it names no key of the node, with the node's key as its key."""
        if self.key:
            return ConfigError(self.detail, key=f"{prefix}.{self.key}", origin=self.origin)
        return ConfigError(self.detail, key=prefix, origin=self.origin)

    def at(self, origin: str) -> ConfigError:
        """The same error, located at the file:line or command line that set its key."""
        return ConfigError(self.detail, key=self.key, origin=origin)


class PluginError(RuntimeError):
    """A plugin broke its contract while running (a loss that returned no LossOutput, ...): the
    message is one line naming the plugin and its file."""


class ConfigWarning(UserWarning):
    """A config that runs but probably not as meant (a masker string that is not one token, ...);
    the command line shows it as one line, "opdlm: warning: ..."."""
