// The web chat page's click-through, in the system's headless Chromium through playwright-core
// (which never downloads a browser). Run by crates/cli/tests/web_chat.rs against a live
// `kiln serve --model smollm2`:
//   node click_through.mjs BASE_URL SCREENSHOT_PNG CHROMIUM_PATH USER_DATA_DIR
// Exits non-zero, with the reason, on the first failed check.
import { chromium } from "playwright-core";

const [base, screenshot, executablePath, userDataDir] = process.argv.slice(2);
if (!userDataDir) {
  console.error("usage: node click_through.mjs BASE_URL SCREENSHOT_PNG CHROMIUM_PATH USER_DATA_DIR");
  process.exit(2);
}
const t0 = Date.now();
const log = (...a) => console.log(`[web_chat ${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
  viewport: { width: 1100, height: 720 },
});
const pageErrors = [];
const foreign = [];
const chatBodies = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(20000);
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") log("console error:", m.text()); });
  page.on("request", (r) => {
    if (!r.url().startsWith(base)) foreign.push(r.url());
    if (r.url() === `${base}/v1/chat/completions`) chatBodies.push(JSON.parse(r.postData()));
  });

  // The last assistant bubble, as the test sees it.
  const lastReply = () => page.evaluate(() => {
    const all = document.querySelectorAll("#messages .assistant");
    const a = all[all.length - 1];
    return {
      count: all.length,
      users: document.querySelectorAll("#messages .user").length,
      text: a ? a.querySelector(".content").textContent : null,
      note: a && a.querySelector(".note") ? a.querySelector(".note").textContent : null,
      streaming: !!a && a.classList.contains("streaming"),
      stopped: !!a && a.classList.contains("stopped"),
      sendDisabled: document.querySelector("#send").disabled,
      stopDisabled: document.querySelector("#stop").disabled,
    };
  });
  // Polls until the reply in flight is over; returns every distinct text length seen meanwhile.
  async function untilDone(timeoutMs, midShot) {
    const seen = new Set();
    let stopWasEnabled = false;
    const end = Date.now() + timeoutMs;
    for (;;) {
      const r = await lastReply();
      if (r.streaming) {
        if (r.text) seen.add(r.text.length);
        if (midShot && r.text.length > 200) {
          await page.screenshot({ path: midShot });
          midShot = null;
        }
        if (!r.stopDisabled && r.sendDisabled) stopWasEnabled = true;
      }
      if (!r.streaming && !r.sendDisabled && r.stopDisabled) return { reply: r, lengths: [...seen], stopWasEnabled };
      check(Date.now() < end, `the reply finished within ${timeoutMs} ms (last state ${JSON.stringify(r)})`);
      await sleep(25);
    }
  }
  async function health() {
    const r = await fetch(`${base}/health`);
    check(r.ok, `GET /health answers 200 (got ${r.status})`);
    return r.json();
  }

  // Load the page; wait for the model list.
  await page.goto(`${base}/`);
  await page.waitForFunction(() => {
    const m = document.querySelector("#model");
    return !m.disabled && m.value !== "" && !document.querySelector("#send").disabled;
  });
  const models = await page.$$eval("#model option", (os) => os.map((o) => o.value));
  log("models:", models.join(", "));
  check(models[0] === "smollm2" && (await page.inputValue("#model")) === "smollm2", "smollm2 is listed and picked");
  check(await page.isDisabled("#stop"), "Stop is disabled while idle");

  await page.fill("#temperature", "0");
  await page.fill("#max-tokens", "200");
  await page.fill("#seed", "7");

  // 1. Type, send, see the tokens stream in.
  await page.fill("#prompt", "Write a short poem about the sea.");
  await page.click("#send");
  const streamingShot = screenshot.replace(/\.png$/, "_streaming.png");
  const first = await untilDone(45000, streamingShot);
  log(`reply 1: ${first.reply.text.length} chars, ${first.lengths.length} distinct lengths while streaming`);
  check(first.lengths.length >= 2, `the reply grew while streaming (lengths seen: ${first.lengths})`);
  check(first.stopWasEnabled, "Stop was enabled (and Send disabled) while streaming");
  check(first.reply.text.trim().length > 0 && !first.reply.stopped, "reply 1 is non-empty and complete");
  check(first.reply.count === 1 && first.reply.users === 1, "one user and one assistant bubble");
  check((await page.inputValue("#prompt")) === "", "the prompt box was emptied");
  const status = await page.textContent("#status");
  check(/^\d+ tokens · [\d.]+ tok\/s · (stop|length)$/.test(status), `the readout shows tokens/s (${status})`);
  const b1 = chatBodies[0];
  check(b1 && b1.stream === true && b1.temperature === 0 && b1.max_tokens === 200 && b1.seed === 7 && b1.model === "smollm2",
    `the request carries the settings (${JSON.stringify(b1)})`);
  check(b1.messages.length === 1 && b1.messages[0].role === "user", "the first request holds the one user message");

  // 2. A long reply, sent with Enter, stopped mid-stream.
  await page.fill("#max-tokens", "1000");
  await page.fill("#prompt", "Tell me a very long story about a dragon and a knight, in many chapters.");
  await page.press("#prompt", "Enter");
  let before;
  for (const end = Date.now() + 30000; ;) {
    before = await lastReply();
    if (before.count === 2 && before.streaming && before.text.length >= 40) break;
    check(Date.now() < end && !(before.count === 2 && !before.streaming),
      `the long reply was still streaming at 40 chars (state ${JSON.stringify(before)})`);
    await sleep(25);
  }
  await page.click("#stop");
  const stopped = await untilDone(3000);
  log(`stopped reply 2 at ${stopped.reply.text.length} chars (had ${before.text.length} when Stop was clicked)`);
  check(stopped.reply.stopped && stopped.reply.note === "(stopped)", "the partial reply is marked stopped");
  check(stopped.reply.text.startsWith(before.text), "the partial text stays");
  check(stopped.reply.text.length < 3000, "the reply did not run on");
  await sleep(500);
  check((await lastReply()).text === stopped.reply.text, "nothing more arrives after Stop");
  const b2 = chatBodies[1];
  check(b2.messages.length === 3 && b2.messages[1].role === "assistant" && b2.messages[1].content === first.reply.text,
    "the second request carries the whole conversation");
  // The server cancelled the request when the connection closed.
  let h;
  for (const end = Date.now() + 5000; ;) {
    h = await health();
    if (h.running === 0 && h.queued === 0) break;
    check(Date.now() < end, `the server dropped the stopped request (health ${JSON.stringify(h)})`);
    await sleep(100);
  }
  check(h.status === "ok", "the server is healthy after Stop");

  // 3. The conversation goes on after a stop.
  await page.fill("#max-tokens", "40");
  await page.fill("#prompt", "Thanks! Now say hello in one word.");
  await page.click("#send");
  const third = await untilDone(30000);
  log(`reply 3: ${JSON.stringify(third.reply.text.slice(0, 60))}`);
  check(third.reply.count === 3 && third.reply.text.trim().length > 0 && !third.reply.stopped, "reply 3 arrived");
  const b3 = chatBodies[2];
  check(b3.messages.length === 5 && b3.messages[3].content === stopped.reply.text, "the stopped partial reply is part of the history");

  // 4. A refused request shows the server's message and gives the turn back.
  await page.fill("#max-tokens", "10000000");
  await page.fill("#prompt", "hi");
  await page.click("#send");
  await page.waitForSelector("#error:not([hidden])");
  const error = await page.textContent("#error");
  log(`error shown: ${error}`);
  check(/400/.test(error) && /max_tokens/.test(error), "the error names the status and the bad setting");
  await page.waitForFunction(() => !document.querySelector("#send").disabled);
  const after = await lastReply();
  check(after.count === 3 && after.users === 3, "the refused turn left no bubbles");
  check((await page.inputValue("#prompt")) === "hi", "the refused prompt is back in the box");
  check((await health()).status === "ok", "the server is healthy at the end");

  await page.screenshot({ path: screenshot });
  log(`screenshots: ${streamingShot}, ${screenshot}`);

  // Clear empties the conversation.
  await page.click("#clear");
  check((await page.$$("#messages .msg")).length === 0 && (await page.isHidden("#error")), "Clear empties the view");
  check(pageErrors.length === 0, `no page errors (${pageErrors.join("; ")})`);
  check(foreign.length === 0, `the page fetched nothing from elsewhere (${foreign.join(", ")})`);
  log("all checks passed");
} finally {
  await context.close();
}
