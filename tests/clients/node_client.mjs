// Sends the calls of a plan through @segment/analytics-node, unmodified, and prints what happened.
// stdin:  {"writeKey": "...", "host": "http://127.0.0.1:PORT", "calls": [{"type": "track", "params": {...}}]}
// stdout: {"messageIds": [...in call order], "errors": [...], "exchanges": [{request, status}]}
import { Analytics } from '@segment/analytics-node'

const chunks = []
for await (const chunk of process.stdin) chunks.push(chunk)
const plan = JSON.parse(Buffer.concat(chunks).toString('utf8'))

// A broken router should fail the test in seconds, not after the library's 10 retries.
const analytics = new Analytics({ writeKey: plan.writeKey, host: plan.host, maxRetries: 2 })

const errors = []
const exchanges = []
analytics.on('error', (err) => errors.push(String(err?.reason ?? err?.message ?? err)))
analytics.on('http_request', (request) => exchanges.push({ request, status: null }))
analytics.on('http_response', (response) => {
  const pending = exchanges.find((e) => e.status === null && e.request.body === response.body)
  if (pending) pending.status = response.status
})

// The callbacks run once each event is delivered or given up on; closeAndFlush sends the last
// partial batch now instead of after flushInterval.
const delivered = Promise.all(
  plan.calls.map(
    ({ type, params }) =>
      new Promise((resolve) => {
        analytics[type](params, (err, ctx) => {
          if (err) errors.push(`${type}: ${err}`)
          resolve(ctx?.event?.messageId ?? null)
        })
      })
  )
)
await analytics.closeAndFlush({ timeout: 20000 })
const messageIds = await delivered
process.stdout.write(JSON.stringify({ messageIds, errors, exchanges }))
