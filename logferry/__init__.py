"""logferry: move log entries from local IPC into Kafka, and process them as consumer groups."""

from logferry.errors import ConfigError, LogferryError

__version__ = "0.1.0"
__all__ = ["ConfigError", "LogferryError", "__version__"]
