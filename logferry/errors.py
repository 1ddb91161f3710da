"""One root exception; the CLI turns any LogferryError into a one-line message and exit 2."""


class LogferryError(Exception):
    """Base of every error logferry raises on purpose."""


class ConfigError(LogferryError):
    """A config file or flag is wrong; the message names the key and the problem."""


class BrokerError(LogferryError):
    """The local development broker cannot be set up, started or stopped."""


class KafkaUnavailableError(LogferryError):
    """Kafka did not answer within the bounded wait."""


class SchemaError(LogferryError):
    """A record cannot be encoded or decoded with a known LogEntry schema."""
