"""Integration tier: the pack loads in a real ComfyUI and every node explains itself there."""

from __future__ import annotations

import pytest

import comfyui_selma

pytestmark = pytest.mark.comfyui


def test_pack_imports_without_errors_in_real_comfyui(comfyui_server):
    log = comfyui_server.log_path.read_text(errors="replace")
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if "comfyui-selma" in line), \
        comfyui_server.log_tail()


def test_every_node_is_served_with_category_description_and_tooltips(comfyui_server):
    object_info = comfyui_server.get_json("/object_info")
    assert comfyui_selma.NODE_CLASS_MAPPINGS, "the pack registers no nodes"
    for node_name, node_class in comfyui_selma.NODE_CLASS_MAPPINGS.items():
        assert node_name in object_info, f"{node_name} missing from /object_info:\n{comfyui_server.log_tail()}"
        served = object_info[node_name]
        assert served["category"].startswith("SELMA/")
        assert served["description"] == node_class.DESCRIPTION
        assert served["display_name"] == comfyui_selma.NODE_DISPLAY_NAME_MAPPINGS[node_name]
        for section in ("required", "optional"):
            for input_name, spec in served["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_name}.{input_name} has no tooltip"
