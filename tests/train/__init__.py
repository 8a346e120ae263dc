"""Training, data, checkpoint, generation and CLI tests (hilt.train, hilt.data, hilt.checkpoint, hilt.cli)."""
