"""The pgmq side: message models and the database behind one interface.

It knows nothing of jobs or routes. Every call takes arrays of message ids, so
claims and acks can be batched without changing callers.
"""

from app.queue.backend import QueueBackend, QueueMetrics, RpcCaller
from app.queue.models import QueueMessage
from app.queue.rpc import RpcError, RpcQueue, SupabaseRpc

__all__ = [
    "QueueBackend",
    "QueueMessage",
    "QueueMetrics",
    "RpcCaller",
    "RpcError",
    "RpcQueue",
    "SupabaseRpc",
]
