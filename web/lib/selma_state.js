/**
 * What a SELMA node shows in the browser, as plain data: events from the nodes go in, JSON-serialisable
 * state comes out. No DOM here, so the logic runs (and is tested) in Node without a browser.
 *
 * Events (sent by nodes/*.py with PromptServer.send_sync; `node` is the node's execution id as a string:
 * "12", or "5:12" for node 12 inside subgraph node 5):
 *   selma.prompts  {kept, target, requests, max_requests, latest[]}  then  {done: true, kept, target,
 *                  requests, reached_target, rejected: {reason: count}, message}
 *   selma.render   {kind: start|batch, done, total, folder, images: [{filename, subfolder, type}]}
 *   selma.train    {kind: start|cache|cache_ready|resume|step|save|notice|done, step, max_steps, loss, lr,
 *                  images_per_s, seconds, ...}  and the node's own final {done: true, step, max_steps, lora_name}
 *   selma.merge    {method, sources[], weights[], rank, output, missing_modules}
 *
 * The snapshot `window.SELMA.state(nodeId)` returns (`publicState`), by kind; null for a node no event
 * has reached since the page loaded:
 *   train    {kind: "train", phase: "waiting"|"starting"|"caching"|"training"|"saving"|"done",
 *             step, maxSteps, points: [[step, loss], ...] (at most 2 x MAX_CHART_POINTS, oldest first),
 *             loss, lr, secondsPerStep, stepsPerSecond, etaSeconds, imagesPerSecond,
 *             cache: {kind, done, total} | null, notices: [string] (the last 3), done, loraName}
 *   prompts  {kind: "prompts", kept, target, requests, maxRequests, latest: [string] (the last 3),
 *             rejected: {reason: count} | null, reachedTarget: boolean | null, message, done}
 *   render   {kind: "render", done, total, previews: [{filename, subfolder, type}] (the newest 6, oldest first;
 *             ComfyUI's /view query, see viewPath)}
 *   merge    {kind: "merge", method, sources: [file name], weights: [number], rank, output, missingModules}
 * Numbers the node has not reported yet are null (counts start at 0).
 */

export const EVENT_KINDS = { "selma.prompts": "prompts", "selma.render": "render", "selma.train": "train",
  "selma.merge": "merge" };
/** The node class that shows each kind: an event never draws on a node of another class. */
export const NODE_TYPES = { prompts: "SelmaSkillPrompts", render: "SelmaRenderDataset", train: "SelmaTrainLoraExpert",
  merge: "SelmaMergeLoraExperts" };
/** The chart keeps at most twice this many points; older points are averaged in pairs to make room. */
export const MAX_CHART_POINTS = 256;
export const LATEST_PROMPTS_SHOWN = 3;
export const PREVIEWS_SHOWN = 6;
const NOTICES_SHOWN = 3;
/** Weight of the newest step time in the running average behind steps/s and the ETA. */
const STEP_TIME_WEIGHT = 0.1;

/** The per-run fields of a train state: what a new run (a `start` event) clears. */
function freshRun() {
  return { phase: "starting", loss: null, lr: null, secondsPerStep: null, stepsPerSecond: null, etaSeconds: null,
    imagesPerSecond: null, cache: null, notices: [], done: false, loraName: null };
}

export function emptyState(kind) {
  switch (kind) {
    case "train":
      return { kind, ...freshRun(), phase: "waiting", step: 0, maxSteps: 0, chart: emptyChart(), points: [] };
    case "prompts":
      return { kind, kept: 0, target: 0, requests: 0, maxRequests: 0, latest: [], rejected: null,
        reachedTarget: null, message: null, done: false };
    case "render":
      return { kind, done: 0, total: 0, previews: [] };
    case "merge":
      return { kind, method: null, sources: [], weights: [], rank: null, output: null, missingModules: 0 };
    default:
      throw new Error(`unknown SELMA node kind ${JSON.stringify(kind)}`);
  }
}

/** An empty loss series: finished buckets of `stride` steps each, and the bucket being filled. */
export function emptyChart() {
  return { buckets: [], stride: 1, pending: null };
}

/**
 * Add one step's loss. Each bucket averages `stride` consecutive steps; when the buckets reach
 * 2 x MAX_CHART_POINTS, neighbours are averaged in pairs and the stride doubles, so a run of any
 * length is drawn from at most 512 evenly spaced points.
 */
export function addPoint(chart, step, loss) {
  const pending = chart.pending ? { ...chart.pending } : { stepSum: 0, lossSum: 0, count: 0 };
  pending.stepSum += step;
  pending.lossSum += loss;
  pending.count += 1;
  if (pending.count < chart.stride) return { ...chart, pending };
  let buckets = [...chart.buckets, [pending.stepSum / pending.count, pending.lossSum / pending.count]];
  let stride = chart.stride;
  if (buckets.length >= 2 * MAX_CHART_POINTS) {
    const paired = [];
    for (let index = 0; index + 1 < buckets.length; index += 2) {
      paired.push([(buckets[index][0] + buckets[index + 1][0]) / 2, (buckets[index][1] + buckets[index + 1][1]) / 2]);
    }
    buckets = paired;
    stride *= 2;
  }
  return { buckets, stride, pending: null };
}

/** Keep only the buckets up to `step` (a resumed or restarted run trains the rest again). */
export function chartUpTo(chart, step) {
  const buckets = chart.buckets.filter(([bucketStep]) => bucketStep <= step);
  return buckets.length ? { buckets, stride: chart.stride, pending: null } : emptyChart();
}

/** The [step, loss] points to draw: the finished buckets and the one being filled. */
export function chartPoints(chart) {
  const { pending } = chart;
  return pending ? [...chart.buckets, [pending.stepSum / pending.count, pending.lossSum / pending.count]]
    : [...chart.buckets];
}

function reduceTrain(state, event) {
  const next = { ...state };
  if (event.done === true && event.kind === undefined) { // the node's own last word: the LoRA is published
    return { ...next, done: true, phase: "done", etaSeconds: 0, step: event.step ?? next.step,
      maxSteps: event.max_steps ?? next.maxSteps, loraName: event.lora_name ?? next.loraName };
  }
  if (event.max_steps !== undefined) next.maxSteps = event.max_steps;
  switch (event.kind) {
    case "start": // the curve stays until a step says where this run begins (a resume keeps its start)
      return { ...next, ...freshRun() };
    case "cache":
      return { ...next, phase: "caching", cache: { kind: event.cache_kind ?? null,
        done: event.done, total: event.total } };
    case "cache_ready":
      return { ...next, phase: "training", cache: null };
    case "resume": {
      const chart = chartUpTo(next.chart, event.step);
      return { ...next, phase: "training", step: event.step, chart, points: chartPoints(chart) };
    }
    case "step": {
      const seconds = Number(event.seconds);
      const average = next.secondsPerStep === null || !(seconds > 0) ? (seconds > 0 ? seconds : next.secondsPerStep)
        : (1 - STEP_TIME_WEIGHT) * next.secondsPerStep + STEP_TIME_WEIGHT * seconds;
      const remaining = Math.max(0, next.maxSteps - event.step);
      // A step at or before the last one seen starts a new run on this node: its curve replaces the old one.
      const kept = event.step <= next.step ? chartUpTo(next.chart, event.step - 1) : next.chart;
      const chart = addPoint(kept, event.step, event.loss);
      return { ...next, phase: "training", step: event.step, loss: event.loss, lr: event.lr ?? next.lr,
        imagesPerSecond: event.images_per_s ?? next.imagesPerSecond, chart, points: chartPoints(chart),
        secondsPerStep: average, stepsPerSecond: average ? 1 / average : null,
        etaSeconds: average ? remaining * average : null };
    }
    case "notice":
      return { ...next, notices: [...next.notices, String(event.message)].slice(-NOTICES_SHOWN) };
    case "done":
      return { ...next, phase: "saving", step: event.step ?? next.step, etaSeconds: 0 };
    default: // save and anything newer: nothing to show
      return next;
  }
}

function reducePrompts(state, event) {
  const next = { ...state, kept: event.kept ?? state.kept, target: event.target ?? state.target,
    requests: event.requests ?? state.requests };
  if (event.done === true) {
    return { ...next, done: true, rejected: { ...(event.rejected ?? {}) }, reachedTarget: Boolean(event.reached_target),
      message: event.message ?? null };
  }
  return { ...next, done: false, rejected: null, reachedTarget: null, message: null,
    maxRequests: event.max_requests ?? state.maxRequests,
    latest: (event.latest ?? state.latest).slice(-LATEST_PROMPTS_SHOWN) };
}

function reduceRender(state, event) {
  const earlier = event.kind === "start" ? [] : state.previews; // a new run shows its own dataset only
  const previews = [...earlier, ...(event.images ?? [])].slice(-PREVIEWS_SHOWN);
  return { ...state, done: event.done ?? state.done, total: event.total ?? state.total, previews };
}

function reduceMerge(state, event) {
  return { ...state, method: event.method, sources: [...(event.sources ?? [])],
    weights: [...(event.weights ?? [])], rank: event.rank ?? null, output: event.output ?? null,
    missingModules: event.missing_modules ?? 0 };
}

const REDUCERS = { train: reduceTrain, prompts: reducePrompts, render: reduceRender, merge: reduceMerge };

/**
 * The state after `event`. `state` may be undefined (the first event seen, e.g. after a page reload) or
 * of another kind (the id now names another node, in another workflow): both start from an empty state.
 */
export function reduce(state, kind, event) {
  return REDUCERS[kind](state?.kind === kind ? state : emptyState(kind), event);
}

/** The state as `window.SELMA.state` gives it: a copy, without the chart's downsampling buckets. */
export function publicState(state) {
  const { chart, ...shown } = state;
  return structuredClone(shown);
}

/** ComfyUI's `/view` query for one output image, relative to the server root. */
export function viewPath(image) {
  const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "",
    type: image.type ?? "output" });
  return `/view?${query}`;
}
