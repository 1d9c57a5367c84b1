"""The LoRA file: read any common layout into one representation, write kohya layout with metadata.

Reading accepts kohya files (sd-scripts, A1111 and model sites), ComfyUI's native layout (its trainer
and LoRA extractor) and diffusers/PEFT files (``save_lora_weights``, old attention-processor files),
for SD 1.x, SD 2.x and SDXL, text encoders included. Each becomes a :class:`Lora`: kohya module name
→ :class:`LoraModule` (``down`` [r, in] or [r, in, kh, kw], ``up`` [out, r] or [out, r, 1, 1],
``alpha``; the module adds ΔW = alpha / r · up · down to its layer), plus the family and metadata.

Writing always produces kohya layout — ``<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``
— with all-string metadata: the ``ss_*`` keys trainers and model sites read and the SAI
``modelspec.*`` keys. That file loads unchanged in ComfyUI's LoraLoader, A1111/Forge and diffusers'
``load_lora_weights``. Writes are atomic.

Refused, with the file (and key) named, before any tensor is used: pickle checkpoints (``.ckpt``,
``.pt``, ``.bin`` …, never unpickled), truncated or non-safetensors files, NaN/Inf tensors, keys that
are not LoRA keys (LoCon-Tucker, LoHa, LoKr, DoRA and full-difference files are other formats),
down/up pairs that do not fit together.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..storage.files import atomic_open
from .architectures import (
    TEXT_ENCODER_1,
    TEXT_ENCODER_2,
    UNET,
    Architecture,
    ModulePath,
    detect_architecture,
    kohya_module_name,
    parse_module_path,
)
from ..families.loading import PICKLE_SUFFIXES
from ..terminal import printable

if TYPE_CHECKING:
    import torch

KOHYA_DOWN = ".lora_down.weight"
KOHYA_UP = ".lora_up.weight"
KOHYA_ALPHA = ".alpha"

# Key suffix → role, longest first where one suffix ends another.
_ROLE_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (KOHYA_DOWN, "down"), (KOHYA_UP, "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (KOHYA_ALPHA, "alpha"),
)
# Key fragments of adapter formats that are not plain LoRA, so merging them as LoRA would be wrong.
_OTHER_FORMATS = (
    (re.compile(r"\.lora_mid\."), "LoCon with a Tucker mid weight (lora_mid)"),
    (re.compile(r"\.dora_scale$|\.lora_magnitude_vector"), "DoRA (dora_scale / lora_magnitude_vector)"),
    (re.compile(r"\.hada_"), "LyCORIS LoHa (hada_*)"),
    (re.compile(r"\.lokr_"), "LyCORIS LoKr (lokr_*)"),
    (re.compile(r"\.oft_"), "OFT"),
    (re.compile(r"\.(diff|diff_b|w_norm|b_norm)$"), "a full weight or bias difference (diff / diff_b / w_norm)"),
    (re.compile(r"\.(set_weight|reshape_weight)$"), "a weight replacement (set_weight / reshape_weight)"),
)
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: flattened LoraConfig per component
_PEFT_COMPONENT_PREFIX = {UNET: "unet.", TEXT_ENCODER_1: "text_encoder.", TEXT_ENCODER_2: "text_encoder_2."}
_SAFETENSORS_MAGIC_LIMIT = 100_000_000  # a header longer than this is not a LoRA header
METADATA_VALUE_SHOWN = 200
MODEL_HASH_KEY = "sshs_model_hash"
LEGACY_HASH_KEY = "sshs_legacy_hash"
_LEGACY_HASH_OFFSET = 0x100000  # sd-webui-additional-networks' old hash: 64 KiB at 1 MiB
_LEGACY_HASH_LENGTH = 0x10000
# modelspec.prediction_type's values (SAI model spec; sd-scripts' PRED_TYPE_EPSILON / PRED_TYPE_V).
MODELSPEC_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}


class LoraFileError(ValueError):
    """A LoRA file (or one key in it) that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: ΔW = alpha / rank · up · down (convolutions: over the flattened kernel)."""

    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self.down.shape[2:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the layer's weight (and of ΔW)."""
        return (self.out_features, self.in_features, *self.kernel_size)

    def down_matrix(self) -> torch.Tensor:
        """``down`` as a float32 [rank, in·kh·kw] matrix."""
        import torch

        return self.down.reshape(self.rank, -1).to(torch.float32)

    def up_matrix(self) -> torch.Tensor:
        """``up`` as a float32 [out, rank] matrix."""
        import torch

        return self.up.reshape(self.out_features, self.rank).to(torch.float32)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in float32, shaped like the layer's weight."""
        return (self.scale * (self.up_matrix() @ self.down_matrix())).reshape(self.weight_shape)


@dataclass
class Lora:
    """A LoRA in memory: kohya module name → module, for one architecture."""

    modules: dict[str, LoraModule]
    architecture: Architecture
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "LoRA"
    layouts: tuple[str, ...] = ("kohya",)

    @property
    def title(self) -> str:
        """``modelspec.title``, else the file name without extension (as sd-scripts' merge does)."""
        return self.metadata.get("modelspec.title") or Path(self.source).stem

    @property
    def ranks(self) -> list[int]:
        return sorted({module.rank for module in self.modules.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({module.alpha for module in self.modules.values()})

    def module_counts(self) -> dict[str, int]:
        """How many modules adapt the UNet and each text encoder (kohya prefixes)."""
        counts: Counter[str] = Counter()
        for name in self.modules:
            counts["unet" if name.startswith("lora_unet_") else name.split("_text_model")[0].removeprefix("lora_")] += 1
        return dict(counts)


# --- reading ---------------------------------------------------------------------------------------------------


def read_lora(path: str | os.PathLike[str], architecture: str | None = None) -> Lora:
    """Read a LoRA ``.safetensors`` file of any supported layout; see the module docstring for what is refused.

    ``architecture`` (``sd1``/``sd2``/``sdxl``) overrides detection from shapes and metadata.
    """
    from safetensors import SafetensorError, safe_open

    source = Path(path)
    _check_safetensors_file(source)
    try:
        with safe_open(os.fspath(source), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {}
            for key in handle.keys():
                try:
                    tensors[key] = handle.get_tensor(key)
                except (SafetensorError, RuntimeError, ValueError) as error:
                    raise LoraFileError(f"{source}: key {key!r} cannot be read ({error}); the file is damaged"
                                        ) from error
    except SafetensorError as error:
        raise LoraFileError(
            f"{source}: not a readable safetensors file ({error}); it may be truncated (an interrupted "
            "download or copy) or another format") from error
    return lora_from_state_dict(tensors, metadata, source=os.fspath(source), architecture=architecture)


def _check_safetensors_file(source: Path) -> None:
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such LoRA file")
    if not source.is_file():
        raise LoraFileError(f"{source}: is a folder; expected a LoRA .safetensors file")
    suffix = source.suffix.lower()
    size = source.stat().st_size
    with source.open("rb") as stream:
        head = stream.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; torch.save: a zip or a pickle.
    header_fits = len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= min(
        _SAFETENSORS_MAGIC_LIMIT, size - 8)
    looks_pickled = head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")
    if suffix in PICKLE_SUFFIXES or (looks_pickled and not header_fits):
        raise LoraFileError(
            f"{source}: a Python pickle ({suffix if suffix in PICKLE_SUFFIXES else 'pickle content'}), which can run "
            "arbitrary code when loaded, so it is never unpickled here; expected a .safetensors LoRA (convert it to "
            "safetensors first)")
    if not header_fits:
        raise LoraFileError(
            f"{source}: not a safetensors file (its first bytes are no header that fits the file of {size} bytes); "
            "it may be truncated or another format")


def lora_from_state_dict(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    source: str = "LoRA",
    architecture: str | None = None,
    default_alpha: float | None = None,
) -> Lora:
    """Build a :class:`Lora` from a state dict of any supported layout (what :func:`read_lora` does after reading).

    A trainer can hand over PEFT's ``get_peft_model_state_dict(unet)`` as it is (bare diffusers module
    paths) and text encoders' with a ``text_encoder.``/``text_encoder_2.`` prefix. A module without an
    ``.alpha`` key gets the PEFT metadata's ``lora_alpha`` (``lora_adapter_metadata``), else
    ``default_alpha``, else alpha = rank (scale 1, how every loader reads a missing alpha).
    """
    import torch

    metadata = {str(key): str(value) for key, value in (metadata or {}).items()}
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        module, role = _split_key(key, source)
        parts.setdefault(module, {})[role] = (key, tensor)
        if not isinstance(tensor, torch.Tensor):
            raise LoraFileError(f"{source}: key {key!r} holds a {type(tensor).__name__}, not a tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoraFileError(f"{source}: key {key!r} holds {bad} NaN/Inf value(s) of {tensor.numel()}; "
                                "the LoRA is broken (a diverged training run?)")
    if not parts:
        raise LoraFileError(f"{source}: holds no tensors; expected LoRA down/up weights")
    peft_config = _peft_metadata(metadata, source)
    paths: dict[ModulePath, tuple[str, torch.Tensor, torch.Tensor, float]] = {}
    for module, roles in parts.items():
        down, up, alpha = _module_parts(module, roles, source)
        path = parse_module_path(module)
        if path is None:
            raise LoraFileError(
                f"{source}: key {roles[next(iter(roles))][0]!r} names no UNet or text-encoder module of SD 1.x, "
                "SD 2.x or SDXL in the kohya (lora_unet_/lora_te_), ComfyUI (diffusion_model./text_encoders.) "
                "or diffusers (unet./text_encoder.) layout")
        if alpha is None:
            alpha = _peft_alpha(peft_config, path, module)
        if alpha is None:
            alpha = float(down.shape[0]) if default_alpha is None else float(default_alpha)
        if path in paths:
            raise LoraFileError(f"{source}: modules {paths[path][0]!r} and {module!r} are the same layer")
        paths[path] = (module, down, up, alpha)
    shapes = {path: (int(up.shape[0]), int(down.shape[1])) for path, (_, down, up, _) in paths.items()}
    try:
        arch = detect_architecture(shapes, metadata, source=source, requested=architecture)
    except ValueError as error:
        raise LoraFileError(str(error)) from error
    modules: dict[str, LoraModule] = {}
    for path, (module, down, up, alpha) in paths.items():
        try:
            name = kohya_module_name(path, arch)
        except ValueError as error:
            raise LoraFileError(f"{source}: module {module!r}: {error}") from error
        if name in modules:
            raise LoraFileError(f"{source}: two modules are both {name!r} in kohya layout (one named {module!r})")
        modules[name] = LoraModule(down=down, up=up, alpha=float(alpha))
    layouts = tuple(sorted({path.layout for path in paths}))
    return Lora(modules=modules, architecture=arch, metadata=metadata, source=source, layouts=layouts)


def _split_key(key: str, source: str) -> tuple[str, str]:
    for pattern, name in _OTHER_FORMATS:
        if pattern.search(key):
            raise LoraFileError(f"{source}: key {key!r} is {name}, not a plain LoRA; this tool reads LoRA down/up "
                                "pairs only")
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    raise LoraFileError(f"{source}: key {key!r} is not a LoRA key; expected names ending in .lora_down.weight / "
                        ".lora_up.weight / .alpha (kohya, ComfyUI) or .lora_A.weight / .lora_B.weight (PEFT)")


def _module_parts(module: str, roles: Mapping[str, tuple[str, Any]], source: str) -> tuple[Any, Any, float | None]:
    for role, partner in (("down", "up"), ("up", "down")):
        if partner not in roles:
            present = roles[role][0] if role in roles else roles["alpha"][0]
            raise LoraFileError(f"{source}: key {present!r} has no {partner} weight beside it (module {module!r}); "
                                "the file is incomplete")
    (down_key, down), (up_key, up) = roles["down"], roles["up"]
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraFileError(f"{source}: {down_key!r} is {tuple(down.shape)} and {up_key!r} is {tuple(up.shape)}; "
                            "expected [rank, in] and [out, rank] (or 4-D for a convolution)")
    if up.shape[1] != down.shape[0] or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise LoraFileError(f"{source}: {up_key!r} {tuple(up.shape)} does not fit {down_key!r} {tuple(down.shape)}; "
                            "expected up [out, rank(, 1, 1)] with the rank of down")
    alpha = None
    if "alpha" in roles:
        alpha_key, alpha_tensor = roles["alpha"]
        if alpha_tensor.numel() != 1:
            raise LoraFileError(f"{source}: {alpha_key!r} holds {alpha_tensor.numel()} values; expected one number")
        alpha = float(alpha_tensor.float().item())
    return down, up, alpha


def _peft_metadata(metadata: Mapping[str, str], source: str) -> dict[str, Any]:
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoraFileError(f"{source}: metadata {PEFT_METADATA_KEY!r} is not JSON ({error})") from error
    return config if isinstance(config, dict) else {}


def _peft_alpha(config: Mapping[str, Any], path: ModulePath, module: str) -> float | None:
    """PEFT's alpha for a module: ``alpha_pattern`` (matched like PEFT does), else ``lora_alpha``."""
    prefix = _PEFT_COMPONENT_PREFIX[path.component]
    if not config or path.layout != "diffusers":
        return None
    dotted = module.split(prefix, 1)[-1] if module.startswith(prefix) else module
    for pattern, value in (config.get(prefix + "alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", dotted):
            return float(value)
    value = config.get(prefix + "lora_alpha")
    return float(value) if value is not None else None


# --- writing ---------------------------------------------------------------------------------------------------


def kohya_state_dict(lora: Lora, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``lora`` in kohya layout; ``dtype`` casts down/up (alpha stays float32)."""
    import torch

    tensors = {}
    for name, module in sorted(lora.modules.items()):
        tensors[name + KOHYA_DOWN] = module.down.to(dtype or module.down.dtype).contiguous()
        tensors[name + KOHYA_UP] = module.up.to(dtype or module.up.dtype).contiguous()
        tensors[name + KOHYA_ALPHA] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return tensors


def write_lora(lora: Lora, path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Path:
    """Write ``lora`` to ``path`` in kohya layout with ``lora.metadata`` (every value a string) and the
    file's own ``sshs_*`` hashes (:func:`safetensors_hashes`, replacing any it was read with), atomically.

    The bytes depend on the content only: the same LoRA and metadata give the same file (see
    :func:`_serialized`)."""
    target = Path(path)
    metadata = {str(key): str(value) for key, value in lora.metadata.items()}
    tensors = kohya_state_dict(lora, dtype)
    metadata[MODEL_HASH_KEY], metadata[LEGACY_HASH_KEY] = safetensors_hashes(tensors, metadata)
    header, data = _serialized(tensors, metadata)
    with atomic_open(target, "wb") as stream:
        stream.write(header)
        stream.write(data)
    return target


def _serialized(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[bytes, memoryview]:
    """The file as (length + header, tensor data), the metadata in sorted key order.

    safetensors keeps metadata in a Rust ``HashMap`` and writes it in an order that changes from one
    call to the next, so two identical merges would differ in their header. The header is JSON padded
    with spaces to a multiple of 8 bytes; it is written again with the same tensor entries and the
    metadata sorted, and the tensor data is kept as the library wrote it.
    """
    from safetensors.torch import save

    serialized = save(dict(tensors), dict(metadata))
    length = int.from_bytes(serialized[:8], "little")
    header = json.loads(serialized[8:8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, memoryview(serialized)[8 + length:]


def format_number(value: float) -> str:
    """``128`` for 128.0, ``0.5`` for 0.5: how sd-scripts writes dims and alphas."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def release_date() -> datetime.date:
    """The day a written file is dated: ``SOURCE_DATE_EPOCH`` (seconds, UTC) when set, else today.

    ``modelspec.date`` is the one metadata value of a merge that its inputs don't decide; the
    reproducible-builds variable lets a user get the same bytes on another day too.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return datetime.date.today()
    if not epoch.isdigit():
        raise LoraFileError(f"SOURCE_DATE_EPOCH: expected whole seconds since 1970, found {epoch[:40]!r}")
    return datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc).date()


def lora_metadata(
    arch: Architecture,
    title: str,
    rank: int,
    alpha: float,
    merged_from: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    date: datetime.date | None = None,
    prediction_type: str | None = None,
    resolution: int | None = None,
) -> dict[str, str]:
    """The ``ss_*`` and SAI ``modelspec.*`` metadata of a LoRA for ``arch``, every value a string.

    ``ss_network_dim``/``ss_network_alpha`` are the rank and alpha most modules have (sd-scripts
    writes one number); ``merged_from`` lists the source titles, joined as sd-scripts does. A trainer
    knows what the base model predicts (``prediction_type``) and the size it trained at
    (``resolution``); without them the family's assumed base model and its native size are written,
    and no ``modelspec.prediction_type``.
    """
    base = arch.base_model(prediction_type)
    size = resolution or base.resolution
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": format_number(alpha),
        "ss_base_model_version": base.base_model_version,
        "ss_v2": str(arch.v2),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{base.modelspec_architecture}/lora",
        "modelspec.implementation": arch.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": (date or release_date()).isoformat(),
    }
    if prediction_type:
        metadata["modelspec.prediction_type"] = MODELSPEC_PREDICTION_TYPES[base.prediction_type]
    if merged_from:
        metadata["modelspec.merged_from"] = ", ".join(merged_from)
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)``: the hashes A1111's additional-networks extension indexes
    a LoRA by, computed as sd-scripts' ``train_util.precalculate_safetensors_hashes`` does.

    Both are taken over the file as it would be written with only the ``ss_*`` metadata (keys added
    later, these two included, do not change them): the model hash is the SHA-256 of everything after
    the header (the tensor bytes, which the metadata never changes), the legacy hash the first 8 hex
    digits of the SHA-256 of the 64 KiB at offset 1 MiB (empty, so a fixed value, for smaller files).
    """
    from safetensors.torch import save

    serialized = save(dict(tensors), {key: value for key, value in metadata.items() if key.startswith("ss_")})
    header_length = int.from_bytes(serialized[:8], "little")
    model_hash = hashlib.sha256(serialized[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(serialized[_LEGACY_HASH_OFFSET:_LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]).hexdigest()
    return model_hash, legacy_hash[:8]


# --- `selma lora info` -----------------------------------------------------------------------------------------


def _range(values: list[float]) -> str:
    shown = [format_number(value) for value in values]
    return shown[0] if len(shown) == 1 else f"{shown[0]}..{shown[-1]} (mixed: {', '.join(shown[:8])}" + \
        (", ..." if len(shown) > 8 else "") + ")"


def describe_lora(lora: Lora, key_count: int | None = None) -> dict[str, Any]:
    """What ``selma lora info`` prints: family, layout, modules, rank, alpha, dtypes, metadata."""
    dtypes = Counter(str(module.down.dtype).removeprefix("torch.") for module in lora.modules.values())
    return {
        "file": lora.source,
        "architecture": lora.architecture.name,
        "architecture_title": lora.architecture.title,
        "layout": "+".join(lora.layouts),
        "modules": len(lora.modules),
        "modules_by_component": lora.module_counts(),
        "keys": key_count if key_count is not None else 3 * len(lora.modules),
        "rank": _range([float(rank) for rank in lora.ranks]),
        "alpha": _range(lora.alphas),
        "dtype": ", ".join(sorted(dtypes)),
        "metadata": dict(sorted(lora.metadata.items())),
    }


def _key_count(path: str | os.PathLike[str]) -> int:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        return len(list(handle.keys()))


def _info(arguments: argparse.Namespace) -> int:
    """Print a description of the file; every text from the file goes through :func:`.terminal.printable`
    (the file may come from anyone), and ``--json`` is ASCII, so it shows no control character either."""
    lora = read_lora(arguments.file, architecture=arguments.architecture or None)
    description = describe_lora(lora, key_count=_key_count(arguments.file))
    if arguments.json:
        print(json.dumps(description, indent=2, ensure_ascii=True))
        return 0
    components = ", ".join(f"{name} {count}" for name, count in sorted(description["modules_by_component"].items()))
    lines = [f"file:         {description['file']}",
             f"architecture: {description['architecture']} ({description['architecture_title']})",
             f"layout:       {description['layout']}",
             f"modules:      {description['modules']} ({components})",
             f"keys:         {description['keys']}",
             f"rank:         {description['rank']}",
             f"alpha:        {description['alpha']}",
             f"dtype:        {description['dtype']}",
             f"metadata:     {len(description['metadata'])} keys"]
    for key, value in description["metadata"].items():
        if not arguments.full and len(value) > METADATA_VALUE_SHOWN:
            value = value[:METADATA_VALUE_SHOWN] + f"... ({len(value)} characters; --full shows all)"
        lines.append(f"  {key}: {value}")
    for line in lines:
        print(printable(line))
    return 0


def register_cli(subparsers: argparse._SubParsersAction, name: str, summary: str) -> None:
    """``selma lora info FILE``."""
    parser = subparsers.add_parser(name, help=summary, description=summary)
    actions = parser.add_subparsers(dest="lora_action", required=True, metavar="{info}")
    info = actions.add_parser("info", help="Print a LoRA file's architecture, layout, rank, alpha, key count and "
                                           "metadata.",
                              description="Read a LoRA file (kohya, ComfyUI or diffusers/PEFT layout) and print "
                                          "its architecture, layout, rank, alpha, key count and metadata.")
    info.add_argument("file", help="the LoRA .safetensors file")
    info.add_argument("--architecture", choices=("sd1", "sd2", "sdxl"), default=None,
                      help="the base model family, when it cannot be told from the file")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.add_argument("--full", action="store_true", help="print long metadata values in full")
    info.set_defaults(handler=_run_cli)


def _run_cli(arguments: argparse.Namespace) -> int:
    try:
        return _info(arguments)
    except (LoraFileError, FileNotFoundError) as error:
        print(printable(f"selma lora info: {error}"), file=sys.stderr)
        return 2
