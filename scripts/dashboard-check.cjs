// Drives the tern dashboard in headless Chromium (Debian's `chromium`,
// through playwright-core), for tests/dashboard.rs.
//
// Usage: node scripts/dashboard-check.cjs ADDRESS SCREENSHOT
//   ADDRESS     what `tern dashboard` prints (the key in its fragment)
//   SCREENSHOT  where to write a PNG of the page at the end
// Environment: TERN_CHROMIUM (default /usr/lib/chromium/chromium); playwright-core
// is found through NODE_PATH (scripts/test installs it).
//
// Protocol with the test, one JSON object per line on stdout:
//   1. {"ready": true, "peers": [keys...], "points": N}  once the page lists peers
//   2. (the test submits a job)
//   3. {"points_seen": [...]}  once the loss plot has gained a point while watched
//   4. {"reply": TEXT, "chunks": N, "meta": TEXT}  after a chat message streamed a reply
// Any failure prints {"error": ...} and exits 1.
'use strict';

const { chromium } = require('playwright-core');

const [address, screenshot] = process.argv.slice(2);
const WAIT_MS = Number(process.env.TERN_DASHBOARD_WAIT_MS || 120000);

function say(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

async function main() {
  if (!address || !screenshot) throw new Error('usage: dashboard-check.cjs ADDRESS SCREENSHOT');
  const browser = await chromium.launch({
    executablePath: process.env.TERN_CHROMIUM || '/usr/lib/chromium/chromium',
    headless: true,
    // Root in CI containers cannot use Chromium's sandbox.
    args: process.getuid && process.getuid() === 0 ? ['--no-sandbox'] : [],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 1400 } });
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console: ${m.text()}`);
  });
  try {
    await page.goto(address);
    // The key leaves the address bar at once.
    if (page.url().includes('token=')) throw new Error(`the key stayed in the address: ${page.url()}`);

    // 1. The swarm: both other nodes listed.
    await page.waitForFunction(() => document.querySelectorAll('#peers tbody tr.peer').length >= 2, null, {
      timeout: WAIT_MS,
    });
    const peers = await page.$$eval('#peers tbody tr.peer', (rows) => rows.map((r) => r.dataset.key));
    const points = Number(await page.getAttribute('#loss-plot', 'data-points'));
    say({ ready: true, peers, points });

    // 3. The loss plot gains a point while the page is open (no reload):
    // the counts seen, sampled every 100 ms, must include two different
    // positive values.
    const seen = [];
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const n = Number(await page.getAttribute('#loss-plot', 'data-points'));
      if (seen[seen.length - 1] !== n) seen.push(n);
      const positive = seen.filter((x) => x > 0);
      if (positive.length >= 2) break;
      if (Date.now() > deadline) throw new Error(`the loss plot never gained a point; counts seen ${seen}`);
      await page.waitForTimeout(100);
    }
    const circles = await page.$$eval('#loss-plot circle.train', (c) => c.length);
    say({ points_seen: seen, circles });

    // 4. A chat message streams a reply.
    await page.waitForFunction(() => document.querySelectorAll('#chat-model option').length > 0, null, {
      timeout: WAIT_MS,
    });
    await page.fill('#chat-max', '24');
    await page.fill('#chat-temp', '0');
    await page.fill('#chat-input', 'Hello there, who are you?');
    await page.click('#chat-send');
    const reply = page.locator('#chat-log .msg.assistant').last();
    await page.waitForFunction(
      () => {
        const r = Array.from(document.querySelectorAll('#chat-log .msg.assistant')).pop();
        return r && r.dataset.done === 'true';
      },
      null,
      { timeout: WAIT_MS },
    );
    const text = (await reply.locator('.text').textContent()) || '';
    const chunks = Number(await reply.getAttribute('data-chunks'));
    const meta = (await reply.locator('.meta').textContent()) || '';
    await page.screenshot({ path: screenshot, fullPage: true });
    if (problems.length) throw new Error(problems.join('; '));
    say({ reply: text, chunks, meta });
  } catch (e) {
    await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
    throw new Error(`${e.message}${problems.length ? ` (also: ${problems.join('; ')})` : ''}`);
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  say({ error: e.message || String(e) });
  process.exit(1);
});
