"""The consumer-group runtime: key-ordered parallel workers, commits, shaping, retries, dead letters."""

from logferry.processors.app import Processor
from logferry.processors.context import Context
from logferry.processors.exactly_once import Output
from logferry.processors.runtime import Hooks

__all__ = ["Context", "Hooks", "Output", "Processor"]
