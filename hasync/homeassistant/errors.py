"""The Home Assistant edge's exceptions (no I/O imports, so callers can catch them without loading aiohttp).

Exceptions::

    HomeAssistantError      base: anything this package raises about Home Assistant
    ├── AuthError           HA rejected the access token (auth_invalid): permanent, retried slowly
    ├── NotConnected        no live connection: unreachable, not HA, handshake failed, or it dropped
    ├── RequestTimeout      HA did not answer a request within ``timeout``
    └── CommandFailed       HA answered a command with an error; carries ``code`` and ``message``
"""

from __future__ import annotations


class HomeAssistantError(Exception):
    """Something went wrong talking to Home Assistant."""


class AuthError(HomeAssistantError):
    """Home Assistant rejected the access token; retrying at once will not help."""


class NotConnected(HomeAssistantError):
    """There is no live connection to Home Assistant (or it dropped while a request waited)."""


class RequestTimeout(HomeAssistantError):
    """Home Assistant did not answer a request in time."""


class CommandFailed(HomeAssistantError):
    """Home Assistant answered a command with an error."""

    def __init__(self, command: str, code: str, message: str) -> None:
        super().__init__(f"{command} failed: {code}: {message}")
        self.command = command
        self.code = code
        self.message = message
