"""comfyui-selma: ComfyUI's entry point.

ComfyUI imports this folder from ``custom_nodes/`` and reads the three names below. Importing it
needs no ComfyUI: node modules import ComfyUI lazily, inside the functions that use it.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
