"""ComfyUI-SVDQuant: 4-bit SVDQuant FLUX.1 for ComfyUI (loader, quantizer, LoRA).

ComfyUI imports this folder as a package by path. Our `nodes/` is imported relatively because
ComfyUI's own top-level module is also called `nodes`. pytest may import this file during
collection under a name that is not a package (the checkout folder's name), where relative
imports cannot work; registration is skipped then.
"""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

import importlib.util as _ilu

# Register only inside a ComfyUI host: pytest imports this file as a package named after the
# checkout folder, where ComfyUI's modules (folder_paths, comfy) are not importable.
if __package__ and _ilu.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
