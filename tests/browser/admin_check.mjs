// Drives the admin page in a headless chromium and prints what it shows as one JSON object.
//
//   node tests/browser/admin_check.mjs <base_url> <admin_key> <out_dir> [<timeline_job_id>]
//
// The browser is the system's chromium (AGENTQ_CHROMIUM, default /usr/bin/chromium), driven by
// playwright-core; no browser is downloaded. The page is read through its data attributes:
//   [data-figure=NAME][data-value=N]       headline figures (data-value is the raw number)
//   tr[data-tenant-id] / tr[data-job-id] / tr[data-step-id] / tr[data-call-id]   table rows
//   td[data-col=NAME][data-value=N]        numeric cells of a row
//   a[data-drill=tenant|job|step]          drill-down links in a row
//   svg[data-chart=NAME]                   charts
//   svg[data-chart=timeline] g[data-step-id] rect[data-phase]   a job's timeline (Gantt)
// Exit status 0 with the JSON on stdout, or 1 with the error on stderr. Screenshots go to
// <out_dir>: admin.png, tenant.png, job.png, step.png, timeline.png (the timeline of
// <timeline_job_id>, when given) and error.png when a check fails.

import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { chromium } from "playwright-core";

const CHROMIUM = process.env.AGENTQ_CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const FAR_SINCE = "2999-01-01";
const FAR_UNTIL = "2999-12-31";
const TIMEOUT_MS = 20_000;

class CheckError extends Error {}

function usage() {
  process.stderr.write("usage: node admin_check.mjs <base_url> <admin_key> <out_dir>\n");
  process.exit(2);
}

function toNumber(raw) {
  if (raw === null || raw === undefined || String(raw).trim() === "") return null;
  const n = Number(raw);
  return Number.isFinite(n) ? n : null;
}

async function readFigures(page) {
  const pairs = await page.$$eval("[data-figure]", (els) =>
    els.map((e) => [e.getAttribute("data-figure"), e.getAttribute("data-value")]));
  const figures = {};
  for (const [name, raw] of pairs) {
    const value = toNumber(raw);
    if (name in figures && figures[name] !== value) {
      throw new CheckError(
        `figure ${name} appears more than once with different values ` +
        `(${figures[name]} and ${value}) on ${page.url()}`);
    }
    figures[name] = value;
  }
  return figures;
}

async function readRows(page, idAttr) {
  const rows = await page.$$eval(`tr[${idAttr}]`, (trs, attr) =>
    trs.map((tr) => ({
      id: tr.getAttribute(attr),
      cells: [...tr.querySelectorAll("td[data-col][data-value]")].map((td) =>
        [td.getAttribute("data-col"), td.getAttribute("data-value")]),
    })), idAttr);
  return rows.map(({ id, cells }) => {
    const cols = {};
    for (const [name, raw] of cells) cols[name] = toNumber(raw);
    return { id, cols };
  });
}

// The timeline's lanes: each step's bars with their phase, call id, start and length (ms).
async function readTimeline(page) {
  return page.$$eval("svg[data-chart=timeline] g[data-step-id]", (groups) =>
    groups.map((g) => ({
      step_id: g.getAttribute("data-step-id"),
      key: g.getAttribute("data-step-key"),
      bars: [...g.querySelectorAll("rect[data-phase]")].map((r) => ({
        phase: r.getAttribute("data-phase"),
        call_id: r.getAttribute("data-call-id"),
        start_ms: Number(r.getAttribute("data-start-ms")),
        ms: Number(r.getAttribute("data-ms")),
        width: Number(r.getAttribute("width")),
        title: r.querySelector("title")?.textContent ?? "",
      })),
    })));
}

async function chartPresent(page, name) {
  return (await page.locator(`svg[data-chart="${name}"]`).count()) > 0;
}

// Status of the last document loaded in the main frame of each page.
const documentStatus = new WeakMap();

async function waitForFigures(page, what) {
  const status = documentStatus.get(page);
  if (status !== undefined && status >= 400) {
    const text = (await page.locator("body").innerText().catch(() => "")).slice(0, 500);
    throw new CheckError(`${what}: ${page.url()} answered HTTP ${status}: ${text}`);
  }
  try {
    await page.locator("[data-figure]").first().waitFor({ state: "attached" });
  } catch (err) {
    const onLogin = (await page.locator("form[data-testid=login]").count()) > 0;
    throw new CheckError(
      `${what}: no [data-figure] on ${page.url()}` +
      (onLogin ? " (the login form is shown: the key was not accepted)" : "") +
      `: ${err.message.split("\n")[0]}`);
  }
}

// Click a link (or button) and wait until the page has navigated away from `fromUrl` and loaded.
async function clickAndNavigate(page, locator, what) {
  const fromUrl = page.url();
  if ((await locator.count()) === 0) throw new CheckError(`${what}: not found on ${fromUrl}`);
  await Promise.all([
    page.waitForURL((u) => u.href !== fromUrl, { waitUntil: "load" }),
    locator.first().click(),
  ]).catch((err) => {
    throw new CheckError(`${what}: no navigation from ${fromUrl}: ${err.message.split("\n")[0]}`);
  });
}

// The first row whose total_tokens cell is > 0 (or, when no row carries that column, the first).
function pickRow(rows, what) {
  if (rows.length === 0) throw new CheckError(`${what}: the table has no rows`);
  const withCol = rows.filter((r) => r.cols.total_tokens !== undefined);
  if (withCol.length === 0) return rows[0];
  const row = withCol.find((r) => r.cols.total_tokens > 0);
  if (!row) throw new CheckError(`${what}: no row has total_tokens > 0`);
  return row;
}

async function drill(page, idAttr, id, kind) {
  const link = page.locator(`tr[${idAttr}="${id}"] a[data-drill=${kind}]`);
  await clickAndNavigate(page, link, `drill-down link a[data-drill=${kind}] of ${idAttr}=${id}`);
  await waitForFigures(page, `the ${kind} page`);
}

async function submitForm(form) {
  const button = form.locator("button[type=submit], input[type=submit], button:not([type])");
  if ((await button.count()) > 0) {
    await button.first().click();
  } else {
    await form.evaluate((f) => f.requestSubmit());
  }
}

async function login(page, baseUrl, key) {
  await page.goto(`${baseUrl}/admin`, { waitUntil: "load" });
  const form = page.locator("form[data-testid=login]");
  if ((await form.count()) === 0) {
    throw new CheckError(`no login form form[data-testid=login] at ${page.url()}`);
  }
  const input = form.locator("input[name=key]");
  if ((await input.count()) === 0) throw new CheckError("the login form has no input[name=key]");
  await input.fill(key);
  await Promise.all([
    page.waitForEvent("framenavigated", (frame) => frame === page.mainFrame()),
    submitForm(form),
  ]).catch((err) => {
    throw new CheckError(`submitting the login form loaded no page: ${err.message.split("\n")[0]}`);
  });
  await page.waitForLoadState("load");
  if ((await page.locator("form[data-testid=login]").count()) > 0) {
    throw new CheckError(
      `after signing in the login form is shown again (at ${page.url()}, HTTP ` +
      `${documentStatus.get(page)}): the key was not accepted`);
  }
  if (new URL(page.url()).pathname.replace(/\/+$/, "") !== "/admin") {
    throw new CheckError(`signing in led to ${page.url()}, not /admin`);
  }
  await waitForFigures(page, "after signing in");
}

async function checkDateFilter(page, baseUrl) {
  const form = page.locator("form[data-testid=date-filter]");
  if ((await form.count()) === 0) {
    throw new CheckError("no date filter form[data-testid=date-filter] on /admin");
  }
  for (const [name, value] of [["since", FAR_SINCE], ["until", FAR_UNTIL]]) {
    const input = form.locator(`input[name=${name}]`);
    if ((await input.count()) === 0) throw new CheckError(`the date filter has no input[name=${name}]`);
    const type = await input.getAttribute("type");
    if (type !== "date") throw new CheckError(`input[name=${name}] has type=${type}, not date`);
    await input.fill(value);
  }
  await Promise.all([
    page.waitForURL((u) => u.pathname.replace(/\/+$/, "") === "/admin" &&
      u.searchParams.get("since") === FAR_SINCE, { waitUntil: "load" }),
    submitForm(form),
  ]).catch((err) => {
    throw new CheckError(
      `submitting the date filter did not load /admin?since=${FAR_SINCE}: ` +
      err.message.split("\n")[0]);
  });
  await waitForFigures(page, "the filtered admin page");
  const figures = await readFigures(page);
  if (!("total_tokens" in figures)) {
    throw new CheckError("the filtered admin page has no [data-figure=total_tokens]");
  }
  await page.goto(`${baseUrl}/admin`, { waitUntil: "load" });
  await waitForFigures(page, "the admin page (unfiltered, again)");
  return figures.total_tokens;
}

async function main() {
  const [baseArg, key, outDir, timelineJob] = process.argv.slice(2);
  if (!baseArg || !key || !outDir) usage();
  const baseUrl = baseArg.replace(/\/+$/, "");
  const baseHost = new URL(baseUrl).host;
  mkdirSync(outDir, { recursive: true });
  for (const name of ["admin.png", "tenant.png", "job.png", "step.png", "timeline.png",
                      "error.png"]) {
    rmSync(join(outDir, name), { force: true });
  }

  const consoleErrors = [];
  const failedRequests = [];
  const externalRequests = [];
  const userDataDir = mkdtempSync(join(tmpdir(), "agentq-chromium-"));
  let context = null;
  let page = null;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1366, height: 900 },
      timeout: 60_000,
    });
    context.setDefaultTimeout(TIMEOUT_MS);
    context.setDefaultNavigationTimeout(TIMEOUT_MS);
    // Nothing may come from anywhere but the server under test: record and refuse the rest.
    await context.route("**/*", (route) => {
      const url = route.request().url();
      let host = null;
      try {
        const u = new URL(url);
        if (u.protocol === "http:" || u.protocol === "https:") host = u.host;
      } catch {
        // not a URL with a host (data:, blob:, ...)
      }
      if (host !== null && host !== baseHost) {
        if (!externalRequests.includes(url)) externalRequests.push(url);
        return route.abort("blockedbyclient");
      }
      return route.continue();
    });
    const watch = (p) => {
      p.on("console", (msg) => {
        if (msg.type() === "error") {
          const where = msg.location()?.url;
          consoleErrors.push(where ? `${msg.text()} (${where})` : msg.text());
        }
      });
      p.on("pageerror", (err) => consoleErrors.push(`uncaught: ${err.message}`));
      p.on("requestfailed", (req) => {
        // ERR_ABORTED: cut short by the next navigation, which is no fault of the page.
        const reason = req.failure()?.errorText ?? "";
        if (!externalRequests.includes(req.url()) && !reason.includes("ERR_ABORTED")) {
          failedRequests.push(`${req.method()} ${req.url()}: ${reason}`);
        }
      });
      p.on("response", (resp) => {
        if (resp.request().isNavigationRequest() && resp.frame() === p.mainFrame()) {
          documentStatus.set(p, resp.status());
        }
        if (resp.status() >= 400) {
          failedRequests.push(`${resp.request().method()} ${resp.url()}: HTTP ${resp.status()}`);
        }
      });
      p.on("websocket", (ws) => {
        const u = new URL(ws.url());
        if (u.host !== baseHost && !externalRequests.includes(ws.url())) {
          externalRequests.push(ws.url());
        }
      });
      p.on("dialog", (d) => d.dismiss().catch(() => {}));
    };
    for (const p of context.pages()) watch(p);
    context.on("page", watch);
    page = context.pages()[0] ?? (await context.newPage());

    // The admin page, after signing in.
    await login(page, baseUrl, key);
    const admin = {
      url: page.url(),
      figures: await readFigures(page),
      tenants: await readRows(page, "data-tenant-id"),
      charts: {
        "spend-per-day": await chartPresent(page, "spend-per-day"),
        latency: await chartPresent(page, "latency"),
      },
    };
    await page.screenshot({ path: join(outDir, "admin.png"), fullPage: true });
    admin.filtered_total_tokens = await checkDateFilter(page, baseUrl);

    // Drill down: tenant, then one of its jobs, then one of that job's steps.
    const tenantRow = pickRow(await readRows(page, "data-tenant-id"), "the tenant table");
    await drill(page, "data-tenant-id", tenantRow.id, "tenant");
    const tenant = {
      id: tenantRow.id,
      url: page.url(),
      figures: await readFigures(page),
      jobs: await readRows(page, "data-job-id"),
    };
    await page.screenshot({ path: join(outDir, "tenant.png"), fullPage: true });

    const jobRow = pickRow(tenant.jobs, `the job table of tenant ${tenant.id}`);
    await drill(page, "data-job-id", jobRow.id, "job");
    const job = {
      id: jobRow.id,
      url: page.url(),
      figures: await readFigures(page),
      steps: await readRows(page, "data-step-id"),
    };
    await page.screenshot({ path: join(outDir, "job.png"), fullPage: true });

    const stepRow = pickRow(job.steps, `the step table of job ${job.id}`);
    await drill(page, "data-step-id", stepRow.id, "step");
    const step = {
      id: stepRow.id,
      url: page.url(),
      figures: await readFigures(page),
      calls: await readRows(page, "data-call-id"),
    };
    await page.screenshot({ path: join(outDir, "step.png"), fullPage: true });

    // The timeline of the job asked for: its lanes, and a screenshot of the chart.
    let timeline = null;
    if (timelineJob) {
      await page.goto(`${baseUrl}/admin/jobs/${timelineJob}`, { waitUntil: "load" });
      await waitForFigures(page, "the timeline's job page");
      const chart = page.locator("[data-testid=timeline]");
      if ((await page.locator("svg[data-chart=timeline]").count()) === 0) {
        throw new CheckError(`no svg[data-chart=timeline] on ${page.url()}`);
      }
      timeline = {
        url: page.url(),
        job_id: await page.locator("svg[data-chart=timeline]").getAttribute("data-job-id"),
        lanes: await readTimeline(page),
      };
      await chart.screenshot({ path: join(outDir, "timeline.png") });
    }

    const report = {
      admin,
      tenant,
      job,
      step,
      timeline,
      console_errors: consoleErrors,
      failed_requests: failedRequests,
      external_requests: externalRequests,
    };
    process.stdout.write(JSON.stringify(report) + "\n");
    return 0;
  } catch (err) {
    process.stderr.write(`admin check failed: ${err instanceof CheckError ? err.message : err.stack}\n`);
    if (page !== null) {
      process.stderr.write(`at ${page.url()}\n`);
      await page.screenshot({ path: join(outDir, "error.png"), fullPage: true }).catch(() => {});
    }
    if (consoleErrors.length) process.stderr.write(`console errors: ${JSON.stringify(consoleErrors)}\n`);
    if (failedRequests.length) process.stderr.write(`failed requests: ${JSON.stringify(failedRequests)}\n`);
    if (externalRequests.length) process.stderr.write(`external requests: ${JSON.stringify(externalRequests)}\n`);
    return 1;
  } finally {
    if (context !== null) await context.close().catch(() => {});
    rmSync(userDataDir, { recursive: true, force: true });
  }
}

process.exitCode = await main();
