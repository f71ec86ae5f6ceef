"""Operations: the Prometheus collector and endpoint, logs, and systemd integration."""
