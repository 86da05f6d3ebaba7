// notebook.mjs — the browser test: Debian's jupyter-notebook on 127.0.0.1 with a token,
// headless Debian chromium driven by playwright-core, opens a notebook on the lathe kernel,
// runs `%help`, checks the output appears, and saves a screenshot. Prints TAP.
//
// Needs: $LATHE_BUILDDIR/lathe (built), /usr/bin/chromium, jupyter-notebook, and
// `npm ci` in this folder (./quickstart check does it).
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

let n = 0, failed = 0;
const ok = (cond, name, detail) => {
  n += 1;
  if (!cond) failed += 1;
  console.log(`${cond ? "ok" : "not ok"} ${n} - ${name}`);
  if (!cond && detail) for (const l of String(detail).split("\n")) console.log(`#   ${l}`);
  return cond;
};

const builddir = process.env.LATHE_BUILDDIR;
const freePort = () => new Promise((resolve) => {
  const s = createServer();
  s.listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => resolve(p)); });
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const work = mkdtempSync(join(tmpdir(), "lathe-browser-"));
  const prefix = join(builddir, "test-prefix");
  execFileSync(join(builddir, "lathe"), ["install", "--prefix", prefix]);
  const nb = {
    cells: [{ cell_type: "code", execution_count: null, id: "c1", metadata: {}, outputs: [],
              source: ["%help"] }],
    metadata: { kernelspec: { name: "lathe", display_name: "Lathe (Gemma 3)", language: "lathe" } },
    nbformat: 4, nbformat_minor: 5,
  };
  writeFileSync(join(work, "help.ipynb"), JSON.stringify(nb));
  const port = await freePort();
  const token = "lathe-test-token";
  const env = { ...process.env, JUPYTER_PATH: join(prefix, "share", "jupyter"),
                JUPYTER_CONFIG_DIR: join(work, "config"), JUPYTER_RUNTIME_DIR: join(work, "runtime"),
                JUPYTER_DATA_DIR: join(work, "data"), HOME: work };
  const server = spawn("/usr/bin/python3", ["-m", "notebook", "--no-browser", "--ip=127.0.0.1",
    `--port=${port}`, `--NotebookApp.token=${token}`, `--notebook-dir=${work}`, "--allow-root",
    "--NotebookApp.open_browser=False"], { env, stdio: ["ignore", "pipe", "pipe"] });
  let serverLog = "";
  server.stdout.on("data", (d) => { serverLog += d; });
  server.stderr.on("data", (d) => { serverLog += d; });
  let browser;
  try {
    let up = false;
    for (let i = 0; i < 100 && !up; i++) {
      try {
        const r = await fetch(`http://127.0.0.1:${port}/api/kernelspecs?token=${token}`);
        if (r.ok) { const j = await r.json(); up = !!j.kernelspecs?.lathe; }
      } catch { /* not up yet */ }
      if (!up) await sleep(200);
    }
    if (!ok(up, "notebook server up with the lathe kernelspec", serverLog.slice(-2000))) return;
    browser = await chromium.launch({
      executablePath: "/usr/bin/chromium", headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
    const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
    await page.goto(`http://127.0.0.1:${port}/notebooks/help.ipynb?token=${token}`);
    let idle = true;
    try {
      await page.waitForSelector("#kernel_indicator_icon.kernel_idle_icon", { timeout: 60000 });
    } catch (e) { idle = false; }
    if (!idle) {
      const cls = await page.getAttribute("#kernel_indicator_icon", "class").catch(() => "?");
      await page.screenshot({ path: join(work, "failed.png") }).catch(() => {});
      serverLog += `\nkernel indicator class: ${cls}; page screenshot: ${join(work, "failed.png")}`;
    }
    if (!ok(idle, "kernel started and idle in the browser", serverLog.slice(-2000))) return;
    await page.click(".cell .CodeMirror");
    await page.keyboard.press("Shift+Enter");
    let text = "";
    try {
      await page.waitForFunction(() => {
        const o = document.querySelector(".cell .output_area");
        return o && o.innerText.includes("%help NAME");
      }, null, { timeout: 60000 });
      text = await page.innerText(".cell .output_area");
    } catch (e) { text = ""; }
    ok(text.includes("%load") && text.includes("%%chat"), "%help output shown in the notebook",
       text || serverLog.slice(-2000));
    const outdir = join(builddir, "tests", "out");
    mkdirSync(outdir, { recursive: true });
    const shot = join(outdir, "browser-help.png");
    await page.screenshot({ path: shot, fullPage: true });
    ok(true, `screenshot saved to ${shot}`);
  } finally {
    if (browser) await browser.close();
    server.kill("SIGTERM");
  }
}

main().catch((e) => ok(false, "browser test ran", e.stack)).finally(() => {
  console.log(`1..${n}`);
  process.exit(failed ? 1 : 0);
});
