/**
 * SELMA's ComfyUI extension: shows what each SELMA node is doing, on the node itself.
 *
 * The nodes send `selma.prompts`, `selma.render`, `selma.train` and `selma.merge` events (see
 * lib/selma_state.js for their fields). Each event updates that node's state and its display, a DOM
 * widget added under the node's widgets the first time an event arrives for it: the Train node draws
 * a live loss curve with steps/s and ETA (kept after the run), the Prompts node shows kept/target and
 * the latest accepted prompts (rejections by reason at the end), the Render node the images done and
 * a preview strip, the Merge node its method, sources, weights and output file.
 *
 * Nothing here blocks the canvas: a handler only updates a small object and a few DOM elements. After
 * a page reload the states start empty and fill from the next event. Events carry no secret: the
 * nodes send counts, prompts, file names and losses, never an API key.
 *
 * For tests and the curious, `window.SELMA.state(nodeId)` returns a copy of a node's state (plain
 * JSON, shapes in lib/selma_state.js `emptyState`) and `window.SELMA.nodes()` the ids that have one.
 */

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { displayLines } from "./lib/display_text.js";
import { drawLossChart } from "./lib/loss_chart.js";
import { EVENT_KINDS, reduce, viewPath } from "./lib/selma_state.js";

const DISPLAY_WIDGET = "selma_display";
const CHART_HEIGHT = 120;
const PREVIEW_SIZE = 48;
const LINE_HEIGHT = 16;

const states = new Map();

function createDisplay(node, kind) {
  const container = document.createElement("div");
  container.className = `selma-display selma-${kind}`;
  Object.assign(container.style, { display: "flex", flexDirection: "column", gap: "4px", overflow: "hidden",
    font: "11px sans-serif", color: "#ccc" });
  const parts = { container, canvas: null, text: document.createElement("div"), strip: null };
  if (kind === "train") {
    parts.canvas = document.createElement("canvas");
    parts.canvas.height = CHART_HEIGHT;
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

function show(node, state) {
  const widget = displayOf(node, state.kind);
  const { canvas, text, strip } = widget.selmaParts;
  text.replaceChildren(...displayLines(state).map((line) => {
    const element = document.createElement("div");
    element.textContent = line; // text, never HTML: prompts come from an LLM
    return element;
  }));
  if (canvas) {
    const width = Math.max(100, Math.round(canvas.clientWidth || node.size[0] - 20));
    if (canvas.width !== width) canvas.width = width;
    drawLossChart(canvas.getContext("2d"), state, canvas.width, canvas.height);
  }
  if (strip) {
    strip.replaceChildren(...state.previews.map((image) => {
      const element = document.createElement("img");
      element.src = api.apiURL(viewPath(image));
      element.alt = image.filename;
      Object.assign(element.style, { width: `${PREVIEW_SIZE}px`, height: `${PREVIEW_SIZE}px`, objectFit: "cover" });
      return element;
    }));
  }
  const [, minimumHeight] = node.computeSize();
  if (node.size[1] < minimumHeight) node.setSize([node.size[0], minimumHeight]);
  app.graph.setDirtyCanvas(true, false);
}

function onEvent(eventName, detail) {
  const kind = EVENT_KINDS[eventName];
  const nodeId = String(detail?.node ?? "");
  if (!kind || !nodeId) return;
  const state = reduce(states.get(nodeId), kind, detail);
  states.set(nodeId, state);
  const node = app.graph?.getNodeById(Number(nodeId)) ?? app.graph?.getNodeById(nodeId);
  if (node) show(node, state);
}

window.SELMA = {
  state: (nodeId) => (states.has(String(nodeId)) ? structuredClone(states.get(String(nodeId))) : null),
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
