// Which node on the canvas an event draws on.
import assert from "node:assert/strict";
import { test } from "node:test";

import { displayNode, nodeForExecutionId } from "../../web/lib/graph_nodes.js";

/** A stand-in for LiteGraph's graph: getNodeById over an object keyed by id, as LGraph's _nodes_by_id is. */
function graph(nodes) {
  const byId = Object.fromEntries(nodes.map((node) => [node.id, node]));
  return { getNodeById: (id) => byId[id] ?? null };
}

const train = { id: 12, type: "SelmaTrainLoraExpert", comfyClass: "SelmaTrainLoraExpert" };
const insideSubgraph = { id: 3, type: "SelmaRenderDataset", comfyClass: "SelmaRenderDataset" };
const subgraphNode = { id: 5, type: "a-subgraph-uuid", subgraph: graph([insideSubgraph]) };
const root = graph([train, subgraphNode, { id: 7, type: "KSampler", comfyClass: "KSampler" }]);

test("a plain id names a node of the root graph", () => {
  assert.equal(nodeForExecutionId(root, "12"), train);
});

test("an id with colons walks into subgraphs, as ComfyUI's UNIQUE_ID does for nodes inside them", () => {
  assert.equal(nodeForExecutionId(root, "5:3"), insideSubgraph);
  assert.equal(nodeForExecutionId(root, "12:3"), null, "node 12 has no subgraph");
  assert.equal(nodeForExecutionId(root, "99"), null);
});

test("an event draws only on a node of the class that sends it", () => {
  assert.equal(displayNode(root, "12", "SelmaTrainLoraExpert"), train);
  assert.equal(displayNode(root, "7", "SelmaTrainLoraExpert"), null, "id 7 is a KSampler in this workflow");
  assert.equal(displayNode(root, "5:3", "SelmaRenderDataset"), insideSubgraph);
  assert.equal(displayNode(undefined, "12", "SelmaTrainLoraExpert"), null, "no graph yet while the page loads");
});
