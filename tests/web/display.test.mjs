// What the user reads on the node, and where the loss curve is drawn.
import assert from "node:assert/strict";
import { test } from "node:test";

import { displayLines, formatDuration } from "../../web/lib/display_text.js";
import { chartGeometry, drawLossChart, smoothed } from "../../web/lib/loss_chart.js";
import { reduce } from "../../web/lib/selma_state.js";

test("durations read as a person would say them", () => {
  assert.equal(formatDuration(9.4), "9s");
  assert.equal(formatDuration(185), "3m 05s");
  assert.equal(formatDuration(3725), "1h 02m");
  assert.equal(formatDuration(null), "–");
});

test("the train node reads step, loss, speed and ETA while it trains", () => {
  const state = reduce(undefined, "train", { kind: "step", step: 120, max_steps: 5000, loss: 0.123456, seconds: 0.5 });
  assert.deepEqual(displayLines(state), ["step 120 / 5000 · loss 0.1235", "2.00 steps/s · ETA 40m 40s"]);
});

test("the prompts node lists rejection reasons at the end and says when the target was missed", () => {
  const state = reduce(undefined, "prompts", { done: true, kept: 80, target: 100, requests: 500,
    reached_target: false, rejected: { too_similar: 12, over_max_words: 0 }, message: "stopped at max_requests" });
  assert.deepEqual(displayLines(state), ["done: kept 80 / 100 prompts · 500 requests", "rejected: too similar 12",
    "stopped at max_requests"]);
});

test("the merge node lists each source with its weight", () => {
  const state = reduce(undefined, "merge", { method: "linear", sources: ["a.safetensors", "b.safetensors"],
    weights: [0.25, 0.75], rank: 256, output: "m.safetensors", missing_modules: 0 });
  assert.deepEqual(displayLines(state), ["linear merge, rank 256 → models/loras/m.safetensors", "a.safetensors × 0.25",
    "b.safetensors × 0.75"]);
});

test("the chart spans the run's steps left to right and the losses bottom to top", () => {
  const geometry = chartGeometry([[0, 2], [50, 1], [100, 0]], 200, 100, 50, 0);
  assert.deepEqual(geometry.raw, [[0, 0], [25, 25], [50, 50]]); // half the width: 100 of 200 steps done
  assert.equal(geometry.minLoss, 0);
  assert.equal(geometry.maxLoss, 2);
});

test("a flat loss sits mid-height instead of dividing by zero", () => {
  const geometry = chartGeometry([[1, 0.3], [2, 0.3]], 2, 10, 10, 0);
  assert.deepEqual(geometry.raw.map(([, y]) => y), [5, 5]);
});

test("the smoothed line is an exponential moving average", () => {
  assert.deepEqual(smoothed([[1, 1], [2, 0], [3, 0]], 0.5), [[1, 1], [2, 0.5], [3, 0.25]]);
});

test("drawing uses only the 2D context calls a canvas has", () => {
  const calls = [];
  const context = new Proxy({}, {
    get: (_, name) => (...args) => calls.push(name),
    set: () => true,
  });
  const state = reduce(undefined, "train", { kind: "step", step: 1, max_steps: 3, loss: 1, seconds: 1 });
  drawLossChart(context, reduce(state, "train", { kind: "step", step: 2, max_steps: 3, loss: 0.5, seconds: 1 }), 200, 100);
  assert.ok(calls.includes("lineTo") && calls.includes("stroke"));
});

test("an empty chart says whether it waits for a step or the run finished before the page saw one", () => {
  const texts = [];
  const context = new Proxy({}, {
    get: (_, name) => (name === "fillText" ? (text) => texts.push(text) : () => {}),
    set: () => true,
  });
  drawLossChart(context, reduce(undefined, "train", { kind: "start" }), 200, 100);
  const finishedEarlier = reduce(undefined, "train", { done: true, step: 50, max_steps: 50, lora_name: "x.safetensors" });
  drawLossChart(context, finishedEarlier, 200, 100);
  assert.deepEqual(texts, ["loss: waiting for the first step", "finished before this page saw a step"]);
});
