"""Algorithm cores: pure functions and small classes over plain tensors (no sockets)."""
