// Event → state: what each SELMA node's display holds after the events a run sends.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  addPoint, chartPoints, emptyChart, emptyState, MAX_CHART_POINTS, publicState, reduce, viewPath,
} from "../../web/lib/selma_state.js";

function run(kind, events, state = undefined) {
  return events.reduce((current, event) => reduce(current, kind, event), state);
}

test("a training run's step events become the loss curve, with steps/s and an ETA", () => {
  const state = run("train", [
    { kind: "start", architecture: "sd1", images: 4 },
    { kind: "step", step: 1, max_steps: 10, loss: 0.5, seconds: 2 },
    { kind: "step", step: 2, max_steps: 10, loss: 0.4, seconds: 2 },
  ]);
  assert.deepEqual(state.points, [[1, 0.5], [2, 0.4]]);
  assert.equal(state.step, 2);
  assert.equal(state.loss, 0.4);
  assert.equal(state.stepsPerSecond, 0.5);
  assert.equal(state.etaSeconds, 16); // 8 steps left at 2 s each
  assert.equal(state.done, false);
});

test("the final curve stays after the node reports the LoRA", () => {
  const training = run("train", [{ kind: "step", step: 1, max_steps: 1, loss: 0.3, seconds: 1 },
    { kind: "done", step: 1, max_steps: 1 }]);
  const finished = reduce(training, "train", { done: true, step: 1, max_steps: 1, lora_name: "x.safetensors" });
  assert.deepEqual(finished.points, [[1, 0.3]]);
  assert.equal(finished.done, true);
  assert.equal(finished.loraName, "x.safetensors");
  assert.equal(finished.etaSeconds, 0);
});

test("after a page reload the state starts from the next event", () => {
  const state = reduce(undefined, "train", { kind: "step", step: 731, max_steps: 5000, loss: 0.2, seconds: 0.5 });
  assert.deepEqual(state.points, [[731, 0.2]]);
  assert.equal(state.maxSteps, 5000);
});

test("a resumed run drops the points past its checkpoint, then redraws them", () => {
  const before = run("train", [1, 2, 3, 4].map((step) => ({ kind: "step", step, max_steps: 4, loss: step, seconds: 1 })));
  const resumed = run("train", [{ kind: "resume", step: 2 }, { kind: "step", step: 3, max_steps: 4, loss: 9, seconds: 1 }],
    before);
  assert.deepEqual(resumed.points, [[1, 1], [2, 2], [3, 9]]);
});

test("queueing the node again keeps the old curve while the trainer starts, then the new run replaces it", () => {
  const steps = (count, loss) => Array.from({ length: count }, (_, index) => (
    { kind: "step", step: index + 1, max_steps: count, loss, seconds: 1 }));
  const long = run("train", steps(5000, 1), undefined);
  const started = run("train", [{ kind: "start" }, { kind: "cache_ready", cache_kind: "text" }], long);
  assert.equal(started.points.length, long.points.length, "the finished curve stays on screen while caching");
  assert.equal(started.stepsPerSecond, null, "the old run's speed is not this run's");
  const fresh = run("train", steps(3, 0.5), started);
  assert.deepEqual(fresh.points, [[1, 0.5], [2, 0.5], [3, 0.5]], "a short run gets every step, not 5000-run buckets");
  assert.equal(fresh.maxSteps, 3);
});

test("an id that now names a node of another kind starts from an empty state", () => {
  const train = reduce(undefined, "train", { kind: "step", step: 4, max_steps: 10, loss: 0.3, seconds: 1 });
  const prompts = reduce(train, "prompts", { kept: 3, target: 9, latest: ["a"] });
  assert.deepEqual(prompts, { ...emptyState("prompts"), kept: 3, target: 9, latest: ["a"] });
});

test("cache progress shows while the trainer caches", () => {
  const state = run("train", [{ kind: "cache", cache_kind: "latents", done: 3, total: 8 }]);
  assert.equal(state.phase, "caching");
  assert.deepEqual(state.cache, { kind: "latents", done: 3, total: 8 });
});

test("the chart keeps a bounded number of evenly spaced points for long runs, covering every step", () => {
  let chart = emptyChart();
  for (let step = 1; step <= 5000; step += 1) chart = addPoint(chart, step, 1 / step);
  const points = chartPoints(chart);
  assert.ok(points.length <= 2 * MAX_CHART_POINTS, `${points.length} points`);
  assert.equal(chart.stride, 16); // 5000 steps / 16 = 312 buckets
  assert.equal(points[0][0], 8.5, "the first bucket averages steps 1 to 16");
  const gaps = new Set(points.slice(1, -1).map(([step], index) => step - points[index][0]));
  assert.deepEqual([...gaps], [16], "buckets are evenly spaced");
  assert.equal(points[points.length - 1][0], (4993 + 5000) / 2, "the newest steps show before their bucket fills");
});

test("the prompts node counts kept prompts and shows the latest, then rejections by reason", () => {
  const running = run("prompts", [{ kept: 3, target: 10, requests: 0, max_requests: 50, latest: ["a", "b", "c"] },
    { kept: 7, target: 10, requests: 1, max_requests: 50, latest: ["a", "b", "c", "d", "e", "f", "g"] }]);
  assert.equal(running.kept, 7);
  assert.deepEqual(running.latest, ["e", "f", "g"]);
  const done = reduce(running, "prompts", { done: true, kept: 10, target: 10, requests: 2, reached_target: true,
    rejected: { too_similar: 4, blocklisted: 1 }, message: "kept 10 of 10" });
  assert.equal(done.done, true);
  assert.deepEqual(done.rejected, { too_similar: 4, blocklisted: 1 });
  assert.equal(done.reachedTarget, true);
});

test("a new prompts run forgets the last run's rejections until it ends", () => {
  const finished = reduce(undefined, "prompts", { done: true, kept: 5, target: 5, reached_target: true,
    rejected: { similar: 2 }, message: "kept 5 of 5" });
  const again = reduce(finished, "prompts", { kept: 3, target: 8, requests: 0, latest: ["x"] });
  assert.deepEqual([again.done, again.rejected, again.reachedTarget, again.message], [false, null, null, null]);
});

test("the render node keeps the newest previews as /view queries", () => {
  const images = (from, to) => Array.from({ length: to - from }, (_, index) => ({
    filename: `${String(from + index).padStart(6, "0")}.png`, subfolder: "selma/datasets/counting", type: "output" }));
  const state = run("render", [{ done: 4, total: 12, images: images(0, 4) }, { done: 8, total: 12, images: images(4, 8) }]);
  assert.equal(state.done, 8);
  assert.equal(state.previews.length, 6);
  assert.equal(state.previews[5].filename, "000007.png");
  assert.equal(viewPath(state.previews[5]), "/view?filename=000007.png&subfolder=selma%2Fdatasets%2Fcounting&type=output");
});

test("a render run's start event replaces the previews of the node's last run", () => {
  const image = (name) => ({ filename: name, subfolder: "selma/datasets/a", type: "output" });
  const earlier = run("render", [{ kind: "batch", done: 2, total: 2, images: [image("old0.png"), image("old1.png")] }]);
  const resumed = run("render", [{ kind: "start", done: 1, total: 4, images: [image("new0.png")] }], earlier);
  assert.deepEqual(resumed.previews.map(({ filename }) => filename), ["new0.png"]);
  assert.deepEqual([resumed.done, resumed.total], [1, 4]);
});

test("the merge node shows method, sources with weights and the output", () => {
  const state = reduce(undefined, "merge", { method: "svd", sources: ["a.safetensors", "b.safetensors"],
    weights: [0.5, 0.5], rank: 128, output: "m.safetensors", missing_modules: 2 });
  assert.deepEqual([state.method, state.sources, state.weights, state.rank, state.output, state.missingModules],
    ["svd", ["a.safetensors", "b.safetensors"], [0.5, 0.5], 128, "m.safetensors", 2]);
});

test("every state is plain JSON", () => {
  for (const kind of ["train", "prompts", "render", "merge"]) {
    const state = emptyState(kind);
    assert.deepEqual(JSON.parse(JSON.stringify(state)), state);
  }
  assert.throws(() => emptyState("paint"), /unknown SELMA node kind "paint"/);
});

test("the snapshot window.SELMA.state gives is a JSON copy without the chart's buckets", () => {
  const state = reduce(undefined, "train", { kind: "step", step: 1, max_steps: 2, loss: 0.7, seconds: 1 });
  const snapshot = publicState(state);
  assert.equal("chart" in snapshot, false);
  assert.deepEqual(snapshot.points, [[1, 0.7]]);
  assert.deepEqual(JSON.parse(JSON.stringify(snapshot)), snapshot);
  snapshot.points.push([2, 0]);
  assert.deepEqual(state.points, [[1, 0.7]], "changing the snapshot leaves the state alone");
});
