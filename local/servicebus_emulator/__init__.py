"""An embedded Azure Service Bus emulator that the unmodified azure-servicebus SDK talks to over AMQP 1.0, with the
read side of the management (ATOM) API on the same port.

See README.md in this directory. Entry points: ``python -m local.servicebus_emulator`` and
:func:`start_emulator` (start it as a subprocess and wait for it to be ready).
"""

from .config import ConfigError, EmulatorConfig, QueueConfig, load_config, parse_config
from .process import CONNECTION_STRING, EmulatorStartError, start_emulator

__all__ = [
    "CONNECTION_STRING",
    "ConfigError",
    "EmulatorConfig",
    "EmulatorStartError",
    "QueueConfig",
    "load_config",
    "parse_config",
    "start_emulator",
]
