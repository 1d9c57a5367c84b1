"""ComfyUI node classes, one module per pipeline stage.

Node classes use ComfyUI's classic schema (``INPUT_TYPES``/``RETURN_TYPES``/``FUNCTION``) and import
ComfyUI modules only inside the functions that run, so this package imports without ComfyUI.
"""

from .merge import SelmaMergeLoraExperts
from .prompts import SelmaSkillPrompts
from .render import SelmaRenderDataset
from .train import SelmaTrainLoraExpert

NODE_CLASSES: dict[str, type] = {
    "SelmaSkillPrompts": SelmaSkillPrompts,
    "SelmaRenderDataset": SelmaRenderDataset,
    "SelmaTrainLoraExpert": SelmaTrainLoraExpert,
    "SelmaMergeLoraExperts": SelmaMergeLoraExperts,
}

NODE_CLASS_MAPPINGS = {name: node_class for name, node_class in NODE_CLASSES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: node_class.DISPLAY_NAME for name, node_class in NODE_CLASSES.items()}
