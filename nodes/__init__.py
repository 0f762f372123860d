"""ComfyUI nodes of ComfyUI-SVDQuant: thin classes over the svdq library (no maths here)."""
import os

import folder_paths

# models/svdq holds our checkpoints; safetensors only, since a pickle can run code. An
# extra_model_paths.yaml `svdq:` entry is read before custom nodes load and creates the key
# with no filter, so keep its folders, add the default one and set the filter either way.
_default = os.path.join(folder_paths.models_dir, "svdq")
_paths = list(folder_paths.folder_names_and_paths.get("svdq", ([], set()))[0])
if _default not in _paths:
    _paths.append(_default)
folder_paths.folder_names_and_paths["svdq"] = (_paths, {".safetensors"})

from .loader import SVDQuantModelLoader  # noqa: E402
from .lora import SVDQLoRA  # noqa: E402
from .quantize import QuantizeCheckpoint  # noqa: E402

NODE_CLASS_MAPPINGS = {
    "SVDQuantModelLoader": SVDQuantModelLoader,
    "SVDQuantQuantizeCheckpoint": QuantizeCheckpoint,
    "SVDQuantLoRA": SVDQLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SVDQuantModelLoader": "SVDQuant Model Loader",
    "SVDQuantQuantizeCheckpoint": "Quantize Checkpoint",
    "SVDQuantLoRA": "SVDQ LoRA",
}
