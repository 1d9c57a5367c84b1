"""The companion engine: every SELMA stage as plain Python, without ComfyUI.

Nodes and the ``selma`` command line call the same functions from here. Nothing in this package
imports ComfyUI, so it runs headless, under ``accelerate launch`` and in tests.
"""
