-- This project's own queues, served by queue-worker (after its migrations).
select queue_worker.attach_queue('sms_queue');
select queue_worker.attach_queue('push_queue');
