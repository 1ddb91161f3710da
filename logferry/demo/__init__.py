"""`logferry demo`: the whole pipeline on the local broker (or --bootstrap-servers), checked and plotted."""

from logferry.demo.run import run_demo

__all__ = ["run_demo"]
