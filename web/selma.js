/**
 * SELMA's ComfyUI extension: shows what each SELMA node is doing, on the node itself.
 *
 * The nodes send `selma.prompts`, `selma.render`, `selma.train` and `selma.merge` events (fields in
 * lib/selma_state.js). Each event updates that node's state; its display, a DOM widget added under the
 * node's widgets the first time an event arrives for it, is redrawn at the next animation frame (one
 * redraw per frame however many events came, none while the tab is hidden). The Train node draws a
 * live loss curve with steps/s and ETA (kept after the run), the Prompts node shows kept/target and
 * the latest accepted prompts (rejections by reason at the end), the Render node the images done and
 * a preview strip, the Merge node its method, sources, weights and output file.
 *
 * After a page reload the states start empty and fill from the next event. An event draws only on a
 * node of the class that sends it (ids repeat across workflows). Events carry no secret: the nodes
 * send counts, prompts, file names and losses, never an API key.
 *
 * For tests and the curious: `window.SELMA.state(nodeId)` returns a copy of a node's state (plain
 * JSON; the shapes are listed at the top of lib/selma_state.js) or null, and `window.SELMA.nodes()`
 * the ids (strings) that have a state.
 */

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { displayLines } from "./lib/display_text.js";
import { displayNode } from "./lib/graph_nodes.js";
import { drawLossChart } from "./lib/loss_chart.js";
import { EVENT_KINDS, NODE_TYPES, publicState, reduce, viewPath } from "./lib/selma_state.js";

const DISPLAY_WIDGET = "selma_display";
const CHART_HEIGHT = 120;
const PREVIEW_SIZE = 48;
const LINE_HEIGHT = 16;

const states = new Map();
const waitingForFrame = new Set();

function createDisplay(node, kind) {
  const container = document.createElement("div");
  container.className = `selma-display selma-${kind}`;
  Object.assign(container.style, { display: "flex", flexDirection: "column", gap: "4px", overflow: "hidden",
    font: "11px sans-serif", color: "var(--input-text, #ccc)" });
  const parts = { container, canvas: null, text: document.createElement("div"), strip: null };
  if (kind === "train") {
    parts.canvas = document.createElement("canvas");
    Object.assign(parts.canvas.style, { width: "100%", height: `${CHART_HEIGHT}px`, borderRadius: "4px" });
    container.append(parts.canvas);
  }
  parts.text.style.whiteSpace = "pre-wrap";
  container.append(parts.text);
  if (kind === "render") {
    parts.strip = document.createElement("div");
    Object.assign(parts.strip.style, { display: "flex", gap: "2px", height: `${PREVIEW_SIZE}px` });
    container.append(parts.strip);
  }
  const minimumHeight = () => (parts.canvas ? CHART_HEIGHT + 8 : 0) + (parts.strip ? PREVIEW_SIZE + 8 : 0)
    + Math.max(2, parts.text.childElementCount) * LINE_HEIGHT + 8;
  const widget = node.addDOMWidget(DISPLAY_WIDGET, "selma", container, { hideOnZoom: false,
    getMinHeight: minimumHeight, getHeight: minimumHeight, serialize: false });
  widget.serialize = false; // a display, not a setting: never in widgets_values or the queued graph
  widget.serializeValue = () => undefined;
  widget.selmaParts = parts;
  return widget;
}

function displayOf(node, kind) {
  const existing = node.widgets?.find((widget) => widget.name === DISPLAY_WIDGET);
  return existing ?? createDisplay(node, kind);
}

/** Size the canvas's pixels to its CSS box times the screen's pixel ratio, so the curve stays sharp. */
function drawChart(canvas, node, state) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(100, Math.round(canvas.clientWidth || node.size[0] - 20));
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(CHART_HEIGHT * ratio)) canvas.height = Math.round(CHART_HEIGHT * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  drawLossChart(context, state, width, CHART_HEIGHT);
}

function show(node, state) {
  const widget = displayOf(node, state.kind);
  const { canvas, text, strip } = widget.selmaParts;
  text.replaceChildren(...displayLines(state).map((line) => {
    const element = document.createElement("div");
    element.textContent = line; // text, never HTML: prompts come from an LLM
    return element;
  }));
  if (canvas) drawChart(canvas, node, state);
  if (strip) {
    strip.replaceChildren(...state.previews.map((image) => {
      const element = document.createElement("img");
      element.src = api.apiURL(viewPath(image));
      element.alt = image.filename;
      element.title = `${image.subfolder}/${image.filename}`;
      Object.assign(element.style, { width: `${PREVIEW_SIZE}px`, height: `${PREVIEW_SIZE}px`, objectFit: "cover" });
      return element;
    }));
  }
  const [, minimumHeight] = node.computeSize();
  if (node.size[1] < minimumHeight) node.setSize([node.size[0], minimumHeight]);
}

function showWaitingNodes() {
  const nodeIds = [...waitingForFrame];
  waitingForFrame.clear(); // first, so one failing display cannot stop the next frames
  for (const nodeId of nodeIds) {
    const state = states.get(nodeId);
    const node = displayNode(app.graph, nodeId, NODE_TYPES[state.kind]);
    if (node) show(node, state);
  }
  app.graph?.setDirtyCanvas(true, false);
}

function onEvent(eventName, detail) {
  const kind = EVENT_KINDS[eventName];
  const nodeId = String(detail?.node ?? "");
  if (!kind || !nodeId) return;
  states.set(nodeId, reduce(states.get(nodeId), kind, detail));
  if (waitingForFrame.size === 0) requestAnimationFrame(showWaitingNodes);
  waitingForFrame.add(nodeId);
}

window.SELMA = {
  state: (nodeId) => (states.has(String(nodeId)) ? publicState(states.get(String(nodeId))) : null),
  nodes: () => [...states.keys()],
};

app.registerExtension({
  name: "comfyui-selma.progress",
  setup() {
    for (const eventName of Object.keys(EVENT_KINDS)) {
      api.addEventListener(eventName, ({ detail }) => onEvent(eventName, detail));
    }
  },
});
