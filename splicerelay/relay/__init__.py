"""The running relay: listeners, upstreams, the connector, the PROXY header reader and
the relay's lifecycle."""
