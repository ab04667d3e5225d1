// Fulcrum's dashboard in a real browser: Debian's headless Chromium, driven by playwright-core.
//
//   node tests/browser/dashboard.mjs URL TOKEN SCREENSHOT [SECONDS]
//
// URL is the dashboard of a running `fulcrum demo` whose admin API wants TOKEN. The script
// checks that the page asks for the token, then shows the fleet live: endpoints, charts that
// change, events; that draining an endpoint from the page takes it out (and undraining brings
// it back); and saves a screenshot to SCREENSHOT (SECONDS later, default 1.5). It prints one line per check and exits 1 at
// the first that fails.
import { chromium } from "playwright-core";

const [url, token, screenshot, wait] = process.argv.slice(2);
if (!url || !token || !screenshot) {
  console.error("usage: node dashboard.mjs URL TOKEN SCREENSHOT");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({
  executablePath,
  headless: true,
  // As root, without the sandbox; no background traffic to hosts this machine cannot reach.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const ok = (what) => console.log(`ok: ${what}`);
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  // Console errors include what the page's content security policy blocked. The stream's
  // refusal without the token (401) is expected.
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().includes("401")) errors.push(m.text());
  });
  await page.goto(url);

  // Without the token the stream is refused and the page asks for it.
  await page.waitForSelector("#token-form:not([hidden])", { timeout: 10_000 });
  await page.waitForSelector("#status.token");
  ok("the page asks for the admin token");
  await page.fill("#token", token);
  await page.click("#token-form button");
  await page.waitForSelector("#status.live", { timeout: 10_000 });
  ok("with the token the stream is live");

  // Endpoints, with their live state.
  await page.waitForFunction(() => document.querySelectorAll("tr[data-endpoint]").length >= 4, null, { timeout: 10_000 });
  const endpoints = await page.$$eval("tr[data-endpoint]", (rows) => rows.map((r) => r.getAttribute("data-endpoint")));
  ok(`endpoints shown: ${endpoints.join(", ")}`);
  await page.waitForFunction(
    () => [...document.querySelectorAll("td[data-field=state]")].every((c) => c.textContent === "available"),
    null,
    { timeout: 10_000 },
  );
  ok("every endpoint available");

  // Charts with lines, which move as new samples arrive.
  const lines = () =>
    page.$$eval(".chart polyline", (ps) => ps.map((p) => `${p.closest(".chart").dataset.chart}/${p.dataset.series}:${p.getAttribute("points")}`));
  await page.waitForFunction(() => document.querySelectorAll(".chart polyline").length >= 4, null, { timeout: 15_000 });
  const before = await lines();
  const charts = await page.$$eval(".chart", (cs) => cs.map((c) => c.dataset.chart));
  ok(`charts: ${charts.join(", ")} (${before.length} lines)`);
  const shareBefore = await page.$$eval("td[data-field=share]", (cs) => cs.map((c) => c.textContent));
  await page.waitForTimeout(3_000);
  const after = await lines();
  if (JSON.stringify(before) === JSON.stringify(after)) throw new Error("the charts did not change in 3 s");
  ok("the charts change");
  const shares = await page.$$eval("td[data-field=share]", (cs) => cs.map((c) => c.textContent.trim()));
  if (!shares.some((s) => s !== "0%")) throw new Error(`no endpoint has a share: ${shares}`);
  ok(`shares: ${shares.join(" ")} (before: ${shareBefore.join(" ")})`);

  // Drain the first endpoint from the page: its state changes, and it is in the timeline.
  const target = endpoints[0];
  const row = `tr[data-endpoint="${target}"]`;
  await page.click(`${row} button[data-action=drain]`);
  await page.waitForFunction((r) => document.querySelector(`${r} td[data-field=state]`).textContent.includes("draining"), row, { timeout: 10_000 });
  ok(`${target} draining after a click on Drain`);
  await page.waitForFunction(
    (id) => [...document.querySelectorAll("#events tbody tr")].some((tr) => tr.textContent.includes(id) && tr.dataset.kind === "drain"),
    target,
    { timeout: 10_000 },
  );
  const events = await page.$$eval("#events tbody tr", (rows) => rows.length);
  ok(`the drain is in the event timeline (${events} events shown)`);
  await page.click(`${row} button[data-action=undrain]`);
  await page.waitForFunction((r) => document.querySelector(`${r} td[data-field=state]`).textContent === "available", row, { timeout: 10_000 });
  ok(`${target} available again after Undrain`);

  // A weight change from the page.
  await page.fill(`${row} input.weight`, "7");
  await page.click(`${row} button[data-action=weight]`);
  await page.waitForFunction((r) => document.querySelector(`${r} [data-field=weight]`).textContent === "7", row, { timeout: 10_000 });
  ok(`weight of ${target} set to 7 from the page`);

  // A policy change from the page, and back.
  const pool = await page.$eval("section[data-pool]", (s) => s.dataset.pool);
  const policyOf = () => page.$eval("section[data-pool] .figures", (f) => f.textContent);
  const original = (await policyOf()).match(/policy (\S+)/)[1];
  for (const policy of ["least_connections", original]) {
    await page.selectOption("section[data-pool] select[data-role=policy]", policy);
    await page.click("section[data-pool] button[data-role=apply-policy]");
    await page.waitForFunction((p) => document.querySelector("section[data-pool] .figures").textContent.startsWith(`policy ${p} `), policy, { timeout: 10_000 });
    ok(`policy of ${pool} set to ${policy} from the page`);
  }

  if (errors.length) throw new Error(`errors in the page: ${errors.join("; ")}`);
  await page.waitForTimeout(Number(wait || 1.5) * 1000);
  await page.screenshot({ path: screenshot, fullPage: true });
  ok(`screenshot saved to ${screenshot}`);
} catch (e) {
  console.error(`FAILED: ${e.message}`);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
