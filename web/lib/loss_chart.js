/** The Train node's loss chart: geometry as pure functions, drawing on any 2D canvas context. */

/** Weight of each new point in the smoothed line (an exponential moving average, as TensorBoard draws). */
export const SMOOTHING = 0.2;

/** The exponential moving average of the losses, one value per point. */
export function smoothed(points, weight = SMOOTHING) {
  let average = null;
  return points.map(([step, loss]) => {
    average = average === null ? loss : (1 - weight) * average + weight * loss;
    return [step, average];
  });
}

/**
 * Where each point lands in a `width` x `height` box with `padding` on every side: steps run from 0 to
 * max(maxSteps, the last step) left to right, losses from the lowest (bottom) to the highest (top).
 */
export function chartGeometry(points, maxSteps, width, height, padding = 4) {
  if (points.length === 0) return { raw: [], smooth: [], minLoss: null, maxLoss: null };
  const losses = points.map(([, loss]) => loss);
  let minLoss = Math.min(...losses);
  let maxLoss = Math.max(...losses);
  if (maxLoss === minLoss) { minLoss -= 0.5; maxLoss += 0.5; } // a flat series sits in the middle
  const lastStep = Math.max(maxSteps || 0, points[points.length - 1][0], 1);
  const x = (step) => padding + (step / lastStep) * (width - 2 * padding);
  const y = (loss) => padding + (1 - (loss - minLoss) / (maxLoss - minLoss)) * (height - 2 * padding);
  const place = (series) => series.map(([step, loss]) => [x(step), y(loss)]);
  return { raw: place(points), smooth: place(smoothed(points)), minLoss: Math.min(...losses),
    maxLoss: Math.max(...losses) };
}

function polyline(context, coordinates) {
  context.beginPath();
  coordinates.forEach(([x, y], index) => (index === 0 ? context.moveTo(x, y) : context.lineTo(x, y)));
  context.stroke();
}

/**
 * Draw the chart of a train state (see selma_state.js) into `context`, filling `width` x `height`.
 * The loss labels sit top right and bottom left, the corners a falling curve leaves free.
 */
export function drawLossChart(context, state, width, height) {
  context.fillStyle = "#1b1b1b";
  context.fillRect(0, 0, width, height);
  const geometry = chartGeometry(state.points, state.maxSteps, width, height, 6);
  context.font = "10px sans-serif";
  context.fillStyle = "#888";
  context.textAlign = "left";
  if (geometry.raw.length === 0) {
    const waiting = state.done ? "finished before this page saw a step" : "loss: waiting for the first step";
    context.fillText(waiting, 8, height / 2);
    return;
  }
  context.lineWidth = 1;
  context.strokeStyle = "rgba(120, 170, 255, 0.35)";
  polyline(context, geometry.raw);
  context.lineWidth = 2;
  context.strokeStyle = "#7ab0ff";
  polyline(context, geometry.smooth);
  context.fillStyle = "#aaa";
  context.fillText(`loss ${Number(geometry.minLoss).toPrecision(3)}`, 8, height - 6);
  context.textAlign = "right";
  context.fillText(`loss ${Number(geometry.maxLoss).toPrecision(3)}`, width - 8, 14);
}
