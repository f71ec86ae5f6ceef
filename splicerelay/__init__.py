"""splicerelay: a zero-copy TCP relay for Linux, built on splice(2) and trio."""

__version__ = "0.1.0"
