"""Training, data, checkpoint, generation and CLI tests (hilt.training.*, hilt.generate, hilt.cli)."""
