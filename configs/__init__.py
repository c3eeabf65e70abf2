"""Experiment configurations: plain modules whose ``config()`` returns a frozen dataclass."""
