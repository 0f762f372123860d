"""ComfyUI nodes of ComfyUI-SVDQuant: thin classes over the svdq library (no maths here)."""
import os

import folder_paths

# models/svdq holds our checkpoints; safetensors only, since a pickle can run code
if "svdq" not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths["svdq"] = (
        [os.path.join(folder_paths.models_dir, "svdq")], {".safetensors"})

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
