"""This project's own processors (the directory holding queues.toml is on the import path)."""
