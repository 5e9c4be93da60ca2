"""The runner: claim -> process -> ack, and what happens when a job fails."""

from app.worker.runner import Runner

__all__ = ["Runner"]
