"""The training-run folder and the trainer process, for everything that starts or inspects a run.

A run folder holds ``config.toml`` (every setting), ``log.jsonl`` (one JSON object per event: step,
loss, lr, images/s …), ``checkpoints/checkpoint-<step>/`` (accelerate state, for resume), a LoRA
file at every save point (``<name>-step<step>.safetensors``) and the final ``<name>.safetensors``.

The ``selma train`` command, the trainer itself and the SELMA Train LoRA Expert node use these
functions, so they agree on what "the same run", "finished" and "resume from" mean. Nothing here loads a
model: the node checks a run's inputs (a single file's key names and the one tensor that tells its
prediction type) and starts the trainer.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..render.dataset import DatasetError
from ..storage.files import check_output_folder
from ..storage.locks import HeldLock, exclusive_lock
from ..families.configs import PREDICTION_TYPES, ModelFamily, check_architecture
from ..families.loading import PICKLE_SUFFIXES, checkpoint_family
from ..lora.file import LoraFileError, release_date
from .config import CONFIG_FILE, TrainConfig, differences, read_config, write_config
from .data import TrainingSet, read_training_set

LOG_FILE = "log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
PACK_ROOT = Path(__file__).resolve().parents[2]
TAIL_LINES = 40


class RunError(ValueError):
    """A run that cannot start as asked; the message names the setting or folder and what to do."""


def final_lora_path(run_dir: str | os.PathLike[str], config: TrainConfig) -> Path:
    return Path(run_dir) / f"{config.output_name}.safetensors"


def step_lora_path(run_dir: str | os.PathLike[str], config: TrainConfig, step: int) -> Path:
    """The LoRA file of a save point, named as sd-scripts names them."""
    return Path(run_dir) / f"{config.output_name}-step{step:08d}.safetensors"


def checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """The complete resumable checkpoints of a run, oldest first (a partial save has another name)."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def latest_step(run_dir: str | os.PathLike[str]) -> int:
    found = checkpoints(run_dir)
    return found[-1][0] if found else 0


@dataclass(frozen=True)
class RunState:
    step: int  # the step of the newest checkpoint (0: nothing to resume)
    finished: bool  # trained to max_train_steps and the final LoRA is there
    final_lora: Path


def run_state(run_dir: str | os.PathLike[str], config: TrainConfig) -> RunState:
    step = latest_step(run_dir)
    final = final_lora_path(run_dir, config)
    if step > config.max_train_steps:
        raise RunError(f"max_train_steps: {config.max_train_steps}, but the run in {run_dir} already trained "
                       f"{step} steps; ask for at least {step} steps, or use a new run folder / LoRA name")
    return RunState(step, step == config.max_train_steps and final.is_file(), final)


def detect_base_family(config: TrainConfig) -> ModelFamily:
    """The family (``sd1``/``sd2``/``sdxl``) and prediction type of the base model, from file names,
    configs and (single files) the one tensor ComfyUI reads; the ``architecture`` and
    ``prediction_type`` settings override what is detected where detection can be wrong."""
    source = Path(config.pretrained_model_name_or_path)
    if source.is_dir():
        index_path = source / "model_index.json"
        if not index_path.is_file():
            raise RunError(f"pretrained_model_name_or_path {source}: a folder without model_index.json; expected "
                           "a diffusers model folder or a .safetensors checkpoint")
        pipeline_class = json.loads(index_path.read_text(encoding="utf-8")).get("_class_name")
        if pipeline_class == "StableDiffusionXLPipeline":
            detected = "sdxl"
        elif pipeline_class == "StableDiffusionPipeline":
            text_config = source / "text_encoder" / "config.json"
            text = json.loads(text_config.read_text(encoding="utf-8")) if text_config.is_file() else {}
            width = text.get("hidden_size")
            detected = "sd2" if width == 1024 else "sd1"
        else:
            raise RunError(f"pretrained_model_name_or_path {source}: a {pipeline_class} folder is not a supported "
                           "architecture; expected Stable Diffusion 1.x, 2.x or SDXL")
        prediction_type = _scheduler_prediction_type(source)
    elif source.is_file():
        if source.suffix.lower() in PICKLE_SUFFIXES or source.suffix.lower() != ".safetensors":
            raise RunError(f"pretrained_model_name_or_path {source}: {source.suffix or 'no extension'} is not "
                           "loaded (pickled checkpoints can run code); expected a .safetensors checkpoint or a "
                           "diffusers folder")
        try:
            family = checkpoint_family(source)
        except ValueError as error:
            raise RunError(f"pretrained_model_name_or_path: {error}; supported: Stable Diffusion 1.x, 2.x, SDXL") \
                from None
        except Exception as error:  # safetensors raises its own error type for a damaged header
            raise RunError(f"pretrained_model_name_or_path {source}: not a readable .safetensors file ({error})") \
                from None
        detected, prediction_type = family.architecture, family.prediction_type
    else:
        raise RunError(f"pretrained_model_name_or_path {source}: no such file or folder; expected a .safetensors "
                       "checkpoint or a diffusers folder")
    if config.prediction_type != "auto":
        prediction_type = config.prediction_type
    requested = config.architecture
    if requested == "auto" or requested == detected:
        return ModelFamily(detected, prediction_type)
    # A folder's sd1/sd2 is a guess from the text encoder's width; the user may say otherwise.
    if source.is_dir() and "sdxl" not in (requested, detected):
        return ModelFamily(check_architecture(requested), prediction_type)
    raise RunError(f"architecture: {requested!r}, but {source} is an {detected} model; use 'auto' or {detected!r}")


def _scheduler_prediction_type(folder: Path) -> str:
    """What a diffusers folder's scheduler config says its UNet predicts (diffusers' default: epsilon)."""
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    try:
        scheduler = json.loads(scheduler_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(f"pretrained_model_name_or_path {folder}: {scheduler_path.name} cannot be read ({error}); "
                       "expected the diffusers folder's scheduler config") from None
    prediction_type = scheduler.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise RunError(f"{scheduler_path}: prediction_type {prediction_type!r}; expected one of "
                       f"{', '.join(PREDICTION_TYPES)}")
    return prediction_type


@dataclass(frozen=True)
class CheckedInputs:
    training_set: TrainingSet
    family: ModelFamily


def check_inputs(config: TrainConfig, verify_images: bool = True,
                 run_dir: str | os.PathLike[str] | None = None) -> CheckedInputs:
    """Everything that can be known before a model loads: the run folder (when given: a folder, or a path
    where one can be made, that this process may write in), settings, dataset, base model family."""
    if run_dir is not None:
        try:
            check_output_folder(run_dir, "run folder")
        except ValueError as error:
            raise RunError(str(error)) from None
    config.validate()
    try:
        release_date()  # every saved LoRA is dated: a malformed SOURCE_DATE_EPOCH would stop the run at its first save
    except LoraFileError as error:
        raise RunError(str(error)) from None
    if config.optimizer_type == "AdamW8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise RunError("optimizer_type: AdamW8bit needs the bitsandbytes package, which is not installed; install "
                       "it (`pip install bitsandbytes`; it needs a CUDA GPU) or use AdamW")
    try:
        training_set = read_training_set(config.train_data_dir, config.caption_extension, verify_images)
    except DatasetError as error:
        raise RunError(str(error)) from None
    return CheckedInputs(training_set, detect_base_family(config))


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with its file and folder settings made absolute (a run folder may be used from anywhere)."""
    import dataclasses

    changes = {}
    for name in ("pretrained_model_name_or_path", "train_data_dir", "model_config_dir", "cache_dir"):
        value = getattr(config, name)
        if value:
            changes[name] = os.path.abspath(os.path.expanduser(value))  # links kept: their names are the user's
    return dataclasses.replace(config, **changes)


def run_folder_lock(run_dir: str | os.PathLike[str]) -> AbstractContextManager[HeldLock]:
    """The exclusive lock of a run folder (``<run>.lock`` beside it), held by whoever writes the run:
    the trainer's main process, and the node while it writes ``config.toml``. The folder is resolved, so
    ``.`` and a link to it name the same lock."""
    return exclusive_lock(Path(run_dir).resolve())


def prepare_run_folder(config: TrainConfig, run_dir: str | os.PathLike[str]) -> Path:
    """Write ``config.toml`` into ``run_dir``; refuse a folder that holds a run with other settings.

    A folder with the same settings is continued (resume, or nothing to do when finished). The
    settings in :data:`~trainer.train.config.CONTINUABLE_FIELDS` may change, e.g. more steps.
    """
    folder = Path(run_dir)
    existing = folder / CONFIG_FILE
    if existing.is_file():
        # Old names in the recorded settings read as the current ones: the file is rewritten with them below.
        changed = differences(read_config(existing, notify=lambda notice: None), config)
        if changed:
            raise RunError(f"run folder {folder}: holds a run with other settings ({'; '.join(changed)}); use the "
                           "same settings to continue it, or another LoRA name / run folder for a new run")
    elif folder.is_dir() and any(path.name != LOG_FILE for path in folder.iterdir()):
        raise RunError(f"run folder {folder}: not empty and holds no {CONFIG_FILE}, so it is no SELMA training "
                       "run; choose a new or empty folder")
    run_state(folder, config)  # refuses fewer steps than already trained
    return write_config(config, folder)


# ------------------------------------------------------------------------------------ the process

def launch_command(config_path: str | os.PathLike[str], num_processes: int = 1,
                   python: str | None = None) -> list[str]:
    """The argument list that starts the trainer under ``accelerate launch`` (never a shell string)."""
    command = [python or sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        command.append("--multi_gpu")
    return command + ["-m", "trainer.train", "--config", os.fspath(config_path)]


def launch_environment() -> dict[str, str]:
    """The environment of the trainer process: the pack's root first on ``PYTHONPATH`` so ``trainer``
    imports the same way from ``custom_nodes/`` and from a pip install; unbuffered output."""
    environment = dict(os.environ)
    existing = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = os.fspath(PACK_ROOT) + (os.pathsep + existing if existing else "")
    environment["PYTHONUNBUFFERED"] = "1"
    environment.setdefault("TOKENIZERS_PARALLELISM", "false")
    return environment


class TrainerProcess:
    """The trainer as a child process in its own process group: its events, its output, its end.

    Output (stdout and stderr together) is read on a thread; :meth:`lines` yields each line as it
    comes, or None every ``poll_s`` seconds while the child is quiet, so the caller can check for a
    cancel. :meth:`stop` kills the whole group (the launcher and every training process).
    """

    def __init__(self, command: list[str], log_path: str | os.PathLike[str] | None = None,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None) -> None:
        self.command = command
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log = Path(log_path).open("a", encoding="utf-8") if log_path else None
        # Its own process group (POSIX session; a new process group on Windows), so stopping it stops
        # the launcher and every training process it started, and ComfyUI's Ctrl-C does not reach them.
        group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else \
            {"start_new_session": True}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env if env is not None else launch_environment(),
                                        cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **group)
        self._reader = threading.Thread(target=self._read, name="selma-trainer-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def lines(self, poll_s: float = 0.25) -> Iterator[str | None]:
        """Each output line as it arrives; None while nothing arrives for ``poll_s`` seconds; ends at exit."""
        while True:
            try:
                line = self._lines.get(timeout=poll_s)
            except queue.Empty:
                yield None
                continue
            if line is None:
                self.process.wait()
                return
            self.tail.append(line)
            if self._log:
                self._log.write(line + "\n")
                self._log.flush()
            yield line

    def events(self, poll_s: float = 0.25) -> Iterator[dict[str, Any] | None]:
        """The trainer's JSON events (other output only goes to the tail and the log); None while quiet."""
        for line in self.lines(poll_s):
            if line is None:
                yield None
                continue
            event = parse_event(line)
            if event is not None:
                yield event

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def tail_text(self) -> str:
        return "\n".join(self.tail)

    def stop(self, grace_s: float = 10.0) -> None:
        """Kill the child's process group: SIGTERM, then SIGKILL after ``grace_s`` seconds."""
        if os.name == "nt":  # no process groups to signal: end the whole tree
            if self.process.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
                self.process.wait()
            self.close()
            return
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _signal_group(self.process.pid, signal.SIGKILL)  # a straggler the launcher left behind
        deadline = time.monotonic() + grace_s
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.close()

    def close(self) -> None:
        if self._reader.is_alive():
            self._reader.join(timeout=5)
        if self._log:
            self._log.close()
            self._log = None


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def parse_event(line: str) -> dict[str, Any] | None:
    """A trainer event from one output line, or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None

