// The Edge Function behind sms_queue: verifies queue-worker's Standard Webhooks
// signature, then sends the SMS. Deploy with:
//   supabase secrets set SMS_SIGNING_SECRET=whsec_...   (the same value as the worker's)
//   supabase functions deploy send-sms
import { Webhook } from "npm:standardwebhooks@1";

const webhook = new Webhook(Deno.env.get("SMS_SIGNING_SECRET")!);

Deno.serve(async (request) => {
  const body = await request.text(); // the raw bytes: the signature covers them exactly
  let job: { to: string; text: string };
  try {
    // Checks webhook-signature over `${id}.${timestamp}.${body}` and refuses a
    // timestamp more than 5 minutes away.
    job = webhook.verify(body, Object.fromEntries(request.headers)) as typeof job;
  } catch {
    return new Response("invalid signature", { status: 401 }); // 4xx: archived, not retried
  }
  // webhook-id is the same for every attempt at one job: remember it to drop repeats.
  const id = request.headers.get("webhook-id");

  const sent = await fetch("https://sms.example.com/v1/messages", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Idempotency-Key": id ?? "" },
    body: JSON.stringify({ to: job.to, text: job.text }),
  });
  if (sent.status === 429) {
    // queue-worker retries after Retry-After (capped at the queue's retry_max_seconds).
    return new Response("busy", { status: 429, headers: { "Retry-After": "30" } });
  }
  if (!sent.ok) {
    return new Response(await sent.text(), { status: sent.status >= 500 ? 502 : 422 });
  }
  return new Response(null, { status: 204 }); // 2xx: the job is done
});
