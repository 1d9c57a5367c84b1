"""Where each Stable Diffusion family keeps its LoRA modules, and which family a LoRA file is for.

Everything this package knows about LoRA key names lives here; ``lora_file`` and the merge only ask.

Three layouts name the same UNet layer three ways:

- **kohya** (sd-scripts, A1111, most files on model sites): ``lora_unet_<module path with _>``.
  sd-scripts trains SD 1.x/2.x on a diffusers-style UNet, so those files use diffusers module paths
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); it trains SDXL on the
  original (LDM/SGM) UNet, so SDXL files use LDM paths
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k``). Text encoders are
  ``lora_te_`` (SD 1.x/2.x) or ``lora_te1_``/``lora_te2_`` (SDXL) + the transformers module path.
- **ComfyUI native** (ComfyUI's own trainer and LoRA extractor): ``diffusion_model.<LDM path>`` and
  ``text_encoders.clip_l|clip_h|clip_g.transformer.<transformers path>``.
- **diffusers/PEFT**: ``unet.<diffusers path>`` (or bare, or ``base_model.model.``),
  ``text_encoder.``/``text_encoder_2.``.

ComfyUI accepts a kohya UNet key in either naming (``comfy.lora.model_lora_keys_unet`` maps both,
through ``comfy.utils.unet_to_diffusers``); diffusers converts both back
(``_convert_non_diffusers_lora_to_diffusers``, ``_maybe_map_sgm_blocks_to_diffusers``). We write each
family in the naming sd-scripts writes, so every loader sees what it was written for.

The block structure of each family is read from the diffusers configs shipped in
``data/configs/<architecture>`` (the real SD 1.5, SD 2.1 and SDXL base configs), so the catalog of
module names below is derived, not typed in.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..families.configs import ARCHITECTURES, CONFIGS_PATH, check_prediction_type, native_resolution

UNET = "unet"
TEXT_ENCODER_1 = "te1"
TEXT_ENCODER_2 = "te2"
COMPONENTS = (UNET, TEXT_ENCODER_1, TEXT_ENCODER_2)

DIFFUSERS_NAMING = "diffusers"
LDM_NAMING = "ldm"

KOHYA_UNET_PREFIX = "lora_unet_"

# ResnetBlock2D's Linear/Conv layers: diffusers name → LDM name (comfy.utils.UNET_MAP_RESNET).
_RESNET_PARTS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class UNetModule:
    """One Linear/Conv layer of a UNet under both of its names; shapes known for transformer layers."""

    diffusers: str  # dotted diffusers path, e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k
    ldm: str  # dotted LDM path, e.g. input_blocks.4.1.transformer_blocks.0.attn2.to_k
    out_features: int | None = None
    in_features: int | None = None

    @property
    def is_attention_projection(self) -> bool:
        """to_q / to_k / to_v / to_out.0 of a self- or cross-attention: what SELMA trains."""
        return bool(re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", self.diffusers))


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family and its prefix in each layout."""

    component: str  # te1 / te2
    kohya_prefix: str  # lora_te_ / lora_te1_ / lora_te2_
    diffusers_prefix: str  # text_encoder. / text_encoder_2.
    comfy_name: str  # clip_l / clip_h / clip_g
    hidden_size: int
    layers: int


@dataclass(frozen=True)
class BaseModelSpec:
    """How a LoRA's metadata names its base model (as sd-scripts writes it)."""

    modelspec_architecture: str  # SAI model spec id of the base model, + "/lora" for a LoRA
    base_model_version: str  # ss_base_model_version
    resolution: int  # the base model's native square size (modelspec.resolution when nothing else is known)
    prediction_type: str  # epsilon / v_prediction


@dataclass(frozen=True)
class Architecture:
    """A Stable Diffusion family as LoRA files see it."""

    name: str  # sd1 / sd2 / sdxl
    title: str
    kohya_unet_naming: str  # diffusers / ldm
    cross_attention_dim: int
    text_encoders: tuple[TextEncoder, ...]
    unet_modules: tuple[UNetModule, ...]
    modelspec_implementation: str
    v2: bool
    # What a LoRA whose base model nobody told us is taken to be for: its weights cannot tell SD 2.x's
    # 512 px epsilon model from 768-v; like sd-scripts we assume 768-v.
    assumed_prediction_type: str

    def base_model(self, prediction_type: str | None = None) -> BaseModelSpec:
        """The base model's names for a UNet predicting ``prediction_type`` (None: the assumed one)."""
        prediction = check_prediction_type(prediction_type or self.assumed_prediction_type)
        modelspec_id, version = _BASE_MODELS[self.name, prediction]
        return BaseModelSpec(modelspec_id, version, native_resolution(self.name, prediction), prediction)

    @functools.cached_property
    def _unet_lookup(self) -> dict[str, UNetModule]:
        lookup = {}
        for module in self.unet_modules:
            lookup[module.diffusers.replace(".", "_")] = module
            lookup[module.ldm.replace(".", "_")] = module
        return lookup

    def unet_module(self, path: str) -> UNetModule | None:
        """The UNet layer at ``path`` (either naming, dots or underscores), or None if this family has none."""
        return self._unet_lookup.get(path.replace(".", "_"))

    def kohya_unet_name(self, module: UNetModule) -> str:
        path = module.ldm if self.kohya_unet_naming == LDM_NAMING else module.diffusers
        return KOHYA_UNET_PREFIX + path.replace(".", "_")

    def text_encoder(self, component: str) -> TextEncoder | None:
        return next((encoder for encoder in self.text_encoders if encoder.component == component), None)

    def attention_projections(self) -> list[tuple[str, UNetModule]]:
        """(kohya module name, layer) of every UNet attention projection, in UNet order."""
        return [(self.kohya_unet_name(module), module) for module in self.unet_modules
                if module.is_attention_projection]


# --- the UNet catalog, derived from a diffusers UNet config -------------------------------------------------------


def _per_block(value: int | list[int] | None, count: int) -> list[int]:
    if value is None:
        return [1] * count
    if isinstance(value, int):
        return [value] * count
    return list(value)


def unet_catalog(config: Mapping) -> tuple[UNetModule, ...]:
    """Every Linear/Conv layer of the UNet that ``config`` (a diffusers UNet2DConditionModel config) builds.

    LDM numbers blocks flat: ``input_blocks`` holds conv_in, then per level ``layers_per_block``
    (resnet, attention) pairs and a downsampler (none after the last level); ``output_blocks`` holds
    ``layers_per_block + 1`` per level, the upsampler after the attention if the level has one.
    Same numbering as ``comfy.utils.unet_to_diffusers`` and diffusers' LDM checkpoint reader.
    """
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layers_per_block = int(config["layers_per_block"])
    cross_attention_dim = int(config["cross_attention_dim"])
    depth = _per_block(config.get("transformer_layers_per_block"), levels)
    down_depth = [depth[level] if "CrossAttn" in kind else 0 for level, kind in enumerate(config["down_block_types"])]
    reversed_depth = list(reversed(depth))
    up_depth = [reversed_depth[level] if "CrossAttn" in kind else 0
                for level, kind in enumerate(config["up_block_types"])]
    mid_has_attention = (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"
    mid_depth = depth[-1] if mid_has_attention else 0
    modules: list[UNetModule] = []

    def add(diffusers: str, ldm: str, out_features: int | None = None, in_features: int | None = None) -> None:
        modules.append(UNetModule(diffusers, ldm, out_features, in_features))

    def resnet(diffusers: str, ldm: str) -> None:
        for diffusers_part, ldm_part in _RESNET_PARTS.items():
            add(f"{diffusers}.{diffusers_part}", f"{ldm}.{ldm_part}")

    def attention(diffusers: str, ldm: str, width: int, transformer_blocks: int) -> None:
        add(f"{diffusers}.proj_in", f"{ldm}.proj_in", width, width)
        for block in range(transformer_blocks):
            for attention_name, key_width in (("attn1", width), ("attn2", cross_attention_dim)):
                for projection in _ATTENTION_PROJECTIONS:
                    in_features = key_width if projection in ("to_k", "to_v") else width
                    path = f"transformer_blocks.{block}.{attention_name}.{projection}"
                    add(f"{diffusers}.{path}", f"{ldm}.{path}", width, in_features)
            feed_forward = f"transformer_blocks.{block}.ff.net"
            add(f"{diffusers}.{feed_forward}.0.proj", f"{ldm}.{feed_forward}.0.proj", 8 * width, width)  # GEGLU
            add(f"{diffusers}.{feed_forward}.2", f"{ldm}.{feed_forward}.2", width, 4 * width)
        add(f"{diffusers}.proj_out", f"{ldm}.proj_out", width, width)

    add("conv_in", "input_blocks.0.0")
    add("time_embedding.linear_1", "time_embed.0")
    add("time_embedding.linear_2", "time_embed.2")
    if config.get("addition_embed_type") == "text_time":
        add("add_embedding.linear_1", "label_emb.0.0")
        add("add_embedding.linear_2", "label_emb.0.2")
    per_level = layers_per_block + 1
    for level in range(levels):
        for layer in range(layers_per_block):
            index = 1 + level * per_level + layer
            resnet(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0")
            if down_depth[level]:
                attention(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1", channels[level],
                          down_depth[level])
        if level < levels - 1:
            index = 1 + level * per_level + layers_per_block
            add(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
    resnet("mid_block.resnets.0", "middle_block.0")
    if mid_depth:
        attention("mid_block.attentions.0", "middle_block.1", channels[-1], mid_depth)
    resnet("mid_block.resnets.1", "middle_block.2")
    reversed_channels = list(reversed(channels))
    for level in range(levels):
        for layer in range(per_level):
            index = level * per_level + layer
            resnet(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0")
            if up_depth[level]:
                attention(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1", reversed_channels[level],
                          up_depth[level])
        if level < levels - 1:
            slot = 2 if up_depth[level] else 1
            index = level * per_level + layers_per_block
            add(f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv")
    add("conv_out", "out.2")
    return tuple(modules)


def _read_config(architecture: str, component: str) -> dict:
    return json.loads((CONFIGS_PATH / architecture / component / "config.json").read_text(encoding="utf-8"))


def _text_encoder(architecture: str, component: str, kohya_prefix: str, comfy_name: str) -> TextEncoder:
    folder = "text_encoder" if component == TEXT_ENCODER_1 else "text_encoder_2"
    config = _read_config(architecture, folder)
    return TextEncoder(component, kohya_prefix, folder + ".", comfy_name, int(config["hidden_size"]),
                       int(config["num_hidden_layers"]))


_FAMILIES = {
    # name: (title, kohya UNet naming, text encoders (component, kohya prefix, ComfyUI name),
    #        modelspec implementation, ss_v2, assumed prediction type)
    "sd1": ("SD 1.x", DIFFUSERS_NAMING, ((TEXT_ENCODER_1, "lora_te_", "clip_l"),), "diffusers", False, "epsilon"),
    "sd2": ("SD 2.x", DIFFUSERS_NAMING, ((TEXT_ENCODER_1, "lora_te_", "clip_h"),), "diffusers", True, "v_prediction"),
    "sdxl": ("SDXL", LDM_NAMING, ((TEXT_ENCODER_1, "lora_te1_", "clip_l"), (TEXT_ENCODER_2, "lora_te2_", "clip_g")),
             "https://github.com/Stability-AI/generative-models", False, "epsilon"),
}
# (family, prediction type) → (SAI modelspec id, ss_base_model_version), as sd-scripts' sai_model_spec
# and model_util.get_model_version_str_for_sd1_sd2 name them; SDXL's names do not change with v.
_BASE_MODELS = {
    ("sd1", "epsilon"): ("stable-diffusion-v1", "sd_v1"),
    ("sd1", "v_prediction"): ("stable-diffusion-v1", "sd_v1_v"),
    ("sd2", "epsilon"): ("stable-diffusion-v2-512", "sd_v2"),
    ("sd2", "v_prediction"): ("stable-diffusion-v2-768-v", "sd_v2_v"),
    ("sdxl", "epsilon"): ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
    ("sdxl", "v_prediction"): ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
}


@functools.cache
def architecture(name: str) -> Architecture:
    """The :class:`Architecture` called ``name`` (``sd1``, ``sd2``, ``sdxl``)."""
    if name not in _FAMILIES:
        raise ValueError(f"architecture: {name!r} is not supported; expected one of {', '.join(ARCHITECTURES)}")
    title, naming, encoders, implementation, v2, assumed_prediction_type = _FAMILIES[name]
    unet_config = _read_config(name, "unet")
    return Architecture(
        name=name, title=title, kohya_unet_naming=naming, cross_attention_dim=int(unet_config["cross_attention_dim"]),
        text_encoders=tuple(_text_encoder(name, *encoder) for encoder in encoders),
        unet_modules=unet_catalog(unet_config), modelspec_implementation=implementation, v2=v2,
        assumed_prediction_type=assumed_prediction_type)


def all_architectures() -> list[Architecture]:
    return [architecture(name) for name in ARCHITECTURES]


# --- reading module names of any layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModulePath:
    """A LoRA module as a file names it, before we know the family: component + path with underscores."""

    component: str  # unet / te1 / te2
    path: str  # underscores, no layout prefix: down_blocks_0_..., input_blocks_4_1_..., text_model_encoder_...
    layout: str  # kohya / comfyui / diffusers
    encoder_name: str = ""  # how the file names its text encoder: lora_te_/lora_te1_/lora_te2_/clip_l/clip_h/clip_g


_DIFFUSERS_UNET_STARTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding",
                          "add_embedding")
_KOHYA_TEXT_ENCODERS = (("lora_te1_", TEXT_ENCODER_1), ("lora_te2_", TEXT_ENCODER_2), ("lora_te_", TEXT_ENCODER_1))
_COMFY_TEXT_ENCODER = re.compile(r"text_encoders\.(clip_[lhg])\.transformer\.(.+)")
_COMFY_COMPONENTS = {"clip_l": TEXT_ENCODER_1, "clip_h": TEXT_ENCODER_1, "clip_g": TEXT_ENCODER_2}
# Old diffusers attention processors name a LoRA after the projection it wraps.
_OLD_DIFFUSERS_PROJECTIONS = {"to_out": "to_out.0"}
_OLD_DIFFUSERS_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _text_path(dotted: str) -> str:
    """A transformers CLIP module path, with the ``text_model.`` prefix transformers 5 dropped put back."""
    parts = dotted.split(".")
    if parts[-1] in _OLD_DIFFUSERS_TEXT_PROJECTIONS and "self_attn" in parts:
        parts[-1] = _OLD_DIFFUSERS_TEXT_PROJECTIONS[parts[-1]]
    dotted = ".".join(part for part in parts if part != "processor")
    if not dotted.startswith(("text_model.", "text_projection")):
        dotted = "text_model." + dotted
    return dotted.replace(".", "_")


def _diffusers_unet_path(dotted: str) -> str:
    parts = [part for part in dotted.split(".") if part != "processor"]
    if parts and parts[-1] in _OLD_DIFFUSERS_PROJECTIONS and len(parts) > 1 and parts[-2] in ("attn1", "attn2"):
        parts[-1] = _OLD_DIFFUSERS_PROJECTIONS[parts[-1]]
    return ".".join(parts).replace(".", "_")


def parse_module_path(module: str) -> ModulePath | None:
    """Split a module name from any supported layout; None when it is none of them."""
    if module.startswith(KOHYA_UNET_PREFIX):
        return ModulePath(UNET, module[len(KOHYA_UNET_PREFIX):], "kohya")
    for prefix, component in _KOHYA_TEXT_ENCODERS:
        if module.startswith(prefix):
            return ModulePath(component, module[len(prefix):], "kohya", encoder_name=prefix)
    if module.startswith("diffusion_model."):
        return ModulePath(UNET, module[len("diffusion_model."):].replace(".", "_"), "comfyui")
    match = _COMFY_TEXT_ENCODER.fullmatch(module)
    if match:
        return ModulePath(_COMFY_COMPONENTS[match[1]], _text_path(match[2]), "comfyui", encoder_name=match[1])
    for prefix, component in (("text_encoder_2.", TEXT_ENCODER_2), ("text_encoder.", TEXT_ENCODER_1)):
        if module.startswith(prefix):
            return ModulePath(component, _text_path(module[len(prefix):]), "diffusers")
    for prefix in ("unet.", "base_model.model.", ""):
        if module.startswith(prefix) and module[len(prefix):].startswith(_DIFFUSERS_UNET_STARTS):
            return ModulePath(UNET, _diffusers_unet_path(module[len(prefix):]), "diffusers")
    return None


def kohya_module_name(path: ModulePath, arch: Architecture) -> str:
    """The kohya module name of ``path`` in ``arch``'s naming; raises ValueError if it has none."""
    if path.component == UNET:
        module = arch.unet_module(path.path)
        if module is not None:
            return arch.kohya_unet_name(module)
        own_naming = _unet_naming(path.path)
        if own_naming == arch.kohya_unet_naming:
            return KOHYA_UNET_PREFIX + path.path  # a layer our catalog lacks, already in the right naming
        raise ValueError(
            f"UNet module {path.path!r} is not a layer of the {arch.title} UNet, so it has no name in the "
            f"{arch.kohya_unet_naming} naming kohya uses for {arch.title}")
    encoder = arch.text_encoder(path.component)
    if encoder is None:
        raise ValueError(f"{arch.title} has one text encoder; found a module of a second one: {path.path!r}")
    return encoder.kohya_prefix + path.path


def _unet_naming(path: str) -> str:
    return DIFFUSERS_NAMING if path.startswith(_DIFFUSERS_UNET_STARTS) else LDM_NAMING


# --- which family ------------------------------------------------------------------------------------------------

_METADATA_FAMILIES = (
    ("modelspec.architecture", "stable-diffusion-xl", "sdxl"),
    ("modelspec.architecture", "stable-diffusion-v2", "sd2"),
    ("modelspec.architecture", "stable-diffusion-v1", "sd1"),
    ("ss_base_model_version", "sdxl", "sdxl"),
    ("ss_base_model_version", "sd_v2", "sd2"),
    ("ss_base_model_version", "sd_v1", "sd1"),
)


def architecture_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family a file's ``modelspec.architecture`` / ``ss_base_model_version`` / ``ss_v2`` names, if any."""
    for key, start, name in _METADATA_FAMILIES:
        if str(metadata.get(key, "")).lower().startswith(start):
            return name
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2"
    return None


def detect_architecture(
    modules: Mapping[ModulePath, tuple[int, int]],
    metadata: Mapping[str, str] | None = None,
    source: str | os.PathLike[str] = "LoRA",
    requested: str | None = None,
) -> Architecture:
    """Name the family a LoRA was trained for from its module names, (out, in) shapes and metadata.

    Names are hard evidence: layers only one family's UNet has (SDXL has no attention in its first
    down block, SD 1.x/2.x one transformer block per attention) and how text encoders are named (a
    second encoder, ``lora_te1_``/``clip_g``, is SDXL). Shapes come next: cross-attention to_k/to_v
    take 768 features in SD 1.x, 1024 in SD 2.x, 2048 in SDXL; a text encoder 1024 wide is SD 2.x.
    The file's metadata (``modelspec.architecture``, ``ss_base_model_version``) settles a tie and
    names the family when no family's shapes fit (tiny test models, resized fine-tunes) — as does
    ``requested``, which must still fit the names.
    """
    metadata = metadata or {}
    reasons: dict[str, str] = {}
    structural = []
    unet_paths = [path for path in modules if path.component == UNET]
    known = [path for path in unet_paths if any(arch.unet_module(path.path) for arch in all_architectures())]
    for arch in all_architectures():
        missing = next((path for path in known if arch.unet_module(path.path) is None), None)
        foreign = next((path for path in modules if path.component != UNET and not _encoder_fits(arch, path)), None)
        if missing is not None:
            reasons[arch.name] = f"the {arch.title} UNet has no layer {missing.path!r}"
        elif foreign is not None:
            reasons[arch.name] = (f"{arch.title} has no text encoder named {foreign.encoder_name or foreign.component} "
                                  f"(module {foreign.path!r})")
        else:
            structural.append(arch)
    if requested is not None:
        wanted = architecture(requested)  # raises naming the choices for an unknown name
        if wanted not in structural:
            raise ValueError(f"{source}: is not a {wanted.title} LoRA: {reasons[wanted.name]}")
        return wanted
    fitting = []
    for arch in structural:
        mismatch = _shape_mismatch(arch, modules)
        if mismatch:
            reasons[arch.name] = mismatch
        else:
            fitting.append(arch)
    named = architecture_from_metadata(metadata)
    for candidates in (fitting, structural):
        if len(candidates) == 1 and (candidates is fitting or candidates[0].name == named):
            return candidates[0]
        chosen = [arch for arch in candidates if arch.name == named]
        if chosen:
            return chosen[0]
        if candidates is fitting and len(fitting) > 1:
            names = " or ".join(arch.name for arch in fitting)
            raise ValueError(f"{source}: could be {names}: its layers and shapes fit each, and its metadata names "
                             "no base model; pass the architecture explicitly")
    details = "; ".join(f"not {name}: {reason}" for name, reason in reasons.items())
    raise ValueError(f"{source}: fits no supported architecture ({details}); if it is for a model of another size, "
                     "pass the architecture explicitly")


def _encoder_fits(arch: Architecture, path: ModulePath) -> bool:
    encoder = arch.text_encoder(path.component)
    if encoder is None:
        return False
    return path.encoder_name in ("", encoder.kohya_prefix, encoder.comfy_name)


def _shape_mismatch(arch: Architecture, modules: Mapping[ModulePath, tuple[int, int]]) -> str | None:
    for path, (out_features, in_features) in modules.items():
        if path.component == UNET:
            module = arch.unet_module(path.path)
            if module is None or module.out_features is None:
                continue
            if (module.out_features, module.in_features) != (out_features, in_features):
                return (f"{path.path} is {out_features}x{in_features} (out x in), the {arch.title} layer is "
                        f"{module.out_features}x{module.in_features}")
        else:
            encoder = arch.text_encoder(path.component)
            is_projection = re.search(r"self_attn_[qkv]_proj$", path.path) is not None
            if encoder is not None and is_projection and in_features != encoder.hidden_size:
                return (f"text encoder layer {path.path} takes {in_features} features, {arch.title}'s "
                        f"{encoder.comfy_name} is {encoder.hidden_size} wide")
    return None

