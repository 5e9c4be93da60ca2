"""queue-worker: processes Supabase pgmq queues fed by Database Webhooks."""

__version__ = "0.1.0"
