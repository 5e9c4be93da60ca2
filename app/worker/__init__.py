"""The runner (claim -> process -> ack / retry / archive), the sweeper, shutdown."""

from app.worker.policy import RetryPolicy
from app.worker.runner import Offer, Runner, RunnerConfig
from app.worker.sweeper import Sweeper

__all__ = ["Offer", "RetryPolicy", "Runner", "RunnerConfig", "Sweeper"]
