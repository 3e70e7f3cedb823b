// Loads analytics.js (@segment/analytics-next, unmodified) in headless Chromium from a page on one
// loopback origin, sends the plan's calls to router on another, and prints what happened.
// stdin:  {"pageUrl": "http://127.0.0.1:A/", "writeKey": "...", "apiHost": "127.0.0.1:B/v1",
//          "deliveryStrategy"?: {...}, "calls": [{"method": "track", "args": [...]}]}
// stdout: {"messageIds": [...in call order], "failures": [...], "requests": [...], "console": [...]}
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium } from 'playwright-core'

const chunks = []
for await (const chunk of process.stdin) chunks.push(chunk)
const plan = JSON.parse(Buffer.concat(chunks).toString('utf8'))

const isLoopback = (url) => ['127.0.0.1', '[::1]', 'localhost'].includes(new URL(url).hostname)

// A new, empty profile every run: no cached settings, no persisted retry queue.
const profile = mkdtempSync(join(tmpdir(), 'router-chromium-'))
const context = await chromium.launchPersistentContext(profile, {
  executablePath: plan.chromium ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    // Belt and braces for the loopback-only rule: no name but 127.0.0.1 resolves, and any
    // non-loopback request goes to a proxy on a closed loopback port (loopback bypasses it).
    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    '--proxy-server=http://127.0.0.1:9',
  ],
})

const requests = []
const console_ = []
let result
try {
  const page = context.pages()[0] ?? (await context.newPage())
  page.on('console', (m) => console_.push(`${m.type()}: ${m.text()}`))
  page.on('pageerror', (e) => console_.push(`pageerror: ${e.message}`))
  page.on('request', (r) =>
    requests.push({ method: r.method(), url: r.url(), headers: r.headers(), body: r.postData() })
  )
  page.on('response', (r) => {
    const entry = requests.findLast((q) => q.url === r.url() && q.status === undefined)
    if (entry) entry.status = r.status()
  })
  page.on('requestfailed', (r) => {
    const entry = requests.findLast((q) => q.url === r.url() && q.status === undefined)
    if (entry) entry.status = `failed: ${r.failure()?.errorText}`
  })
  await page.goto(plan.pageUrl)
  result = await page.evaluate(async ({ writeKey, apiHost, deliveryStrategy, calls }) => {
    const segment = { apiKey: writeKey, apiHost, protocol: 'http', deliveryStrategy }
    const [analytics] = await window.AnalyticsNext.AnalyticsBrowser.load(
      {
        writeKey,
        // Inline settings instead of fetching them from Segment's CDN. No remote metrics: they
        // would go to <apiHost>/m, which router does not serve.
        cdnSettings: { integrations: { 'Segment.io': segment }, metrics: { sampleRate: 0 } },
      },
      { integrations: { 'Segment.io': segment } }
    )
    // One call at a time: each promise settles once its event's request has been answered
    // (in batching mode, once the batch it completes has been).
    const contexts = []
    for (const { method, args } of calls) contexts.push(await analytics[method](...args))
    return {
      messageIds: contexts.map((ctx) => ctx.event.messageId),
      failures: contexts
        .map((ctx) => ctx.failedDelivery())
        .filter(Boolean)
        .map((f) => String(f.reason)),
    }
  }, plan)
} finally {
  await context.close()
  rmSync(profile, { recursive: true, force: true })
}
const offLoopback = requests.filter((r) => !isLoopback(r.url)).map((r) => r.url)
process.stdout.write(JSON.stringify({ ...result, offLoopback, requests, console: console_ }))
