/** Finding the node an event is about, in ComfyUI's graph (duck-typed: anything with getNodeById). */

/**
 * The node an execution id names: "12" is node 12 of the root graph, "5:12" node 12 inside the subgraph
 * of node 5 (ComfyUI's UNIQUE_ID for nodes in subgraphs). Null when the path leads nowhere.
 */
export function nodeForExecutionId(rootGraph, executionId) {
  const path = String(executionId).split(":");
  const localId = path.pop();
  let graph = rootGraph;
  for (const id of path) graph = graph?.getNodeById(id)?.subgraph;
  return graph?.getNodeById(localId) ?? null;
}

/**
 * The node that should show an event of class `nodeType`, or null. The type check matters: ids repeat
 * across workflows, and an event from a run queued in another workflow tab must not draw on whatever
 * node has that id in the workflow on screen.
 */
export function displayNode(rootGraph, executionId, nodeType) {
  const node = nodeForExecutionId(rootGraph, executionId);
  return node && (node.comfyClass ?? node.type) === nodeType ? node : null;
}
