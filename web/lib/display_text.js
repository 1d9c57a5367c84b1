/** The text lines a SELMA node shows under its widgets, from its state (see selma_state.js). */

const PROMPT_CHARACTERS_SHOWN = 90;

/** 3725 s → "1h 02m", 185 s → "3m 05s", 9.4 s → "9s". */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const whole = Math.max(0, Math.round(seconds));
  const hours = Math.floor(whole / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const rest = whole % 60;
  if (hours > 0) return `${hours}h ${String(minutes).padStart(2, "0")}m`;
  if (minutes > 0) return `${minutes}m ${String(rest).padStart(2, "0")}s`;
  return `${rest}s`;
}

function formatLoss(loss) {
  return loss === null || loss === undefined ? "–" : Number(loss).toPrecision(4);
}

function shorten(text, length = PROMPT_CHARACTERS_SHOWN) {
  return text.length <= length ? text : `${text.slice(0, length - 1)}…`;
}

function trainLines(state) {
  if (state.done) {
    const lines = [`done: ${state.step} / ${state.maxSteps} steps · final loss ${formatLoss(state.loss)}`];
    if (state.loraName) lines.push(`→ models/loras/${state.loraName}`);
    return lines;
  }
  if (state.phase === "caching" && state.cache) {
    return [`caching ${state.cache.kind ?? "inputs"}: ${state.cache.done} / ${state.cache.total}`];
  }
  if (state.phase === "waiting" || state.phase === "starting") return ["starting the trainer…", ...state.notices];
  const speed = state.stepsPerSecond === null ? "–" : state.stepsPerSecond.toFixed(2);
  return [`step ${state.step} / ${state.maxSteps} · loss ${formatLoss(state.loss)}`,
    `${speed} steps/s · ETA ${formatDuration(state.etaSeconds)}`, ...state.notices];
}

function promptLines(state) {
  if (state.done) {
    const reasons = Object.entries(state.rejected ?? {}).filter(([, count]) => count > 0)
      .map(([reason, count]) => `${reason.replaceAll("_", " ")} ${count}`);
    const lines = [`done: kept ${state.kept} / ${state.target} prompts · ${state.requests} requests`,
      reasons.length ? `rejected: ${reasons.join(", ")}` : "rejected: none"];
    if (!state.reachedTarget && state.message) lines.push(state.message);
    return lines;
  }
  return [`kept ${state.kept} / ${state.target} prompts · ${state.requests} requests`,
    ...state.latest.map((prompt) => `“${shorten(prompt)}”`)];
}

function renderLines(state) {
  return [`rendered ${state.done} / ${state.total} images`];
}

function mergeLines(state) {
  if (!state.method) return [];
  const lines = [`${state.method} merge${state.rank ? `, rank ${state.rank}` : ""} → models/loras/${state.output}`];
  state.sources.forEach((source, index) => {
    const weight = state.weights[index];
    lines.push(`${source} × ${weight === undefined ? "?" : Number(weight.toPrecision(4))}`);
  });
  if (state.missingModules > 0) lines.push(`${state.missingModules} modules missing in some experts (merged as zero)`);
  return lines;
}

const LINES = { train: trainLines, prompts: promptLines, render: renderLines, merge: mergeLines };

export function displayLines(state) {
  return LINES[state.kind](state);
}
