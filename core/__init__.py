"""The leaf every other package may import: the project's error types, the hardware checks, atomic writes and
model-folder reading. It imports nothing from the rest of the project."""
from core.errors import ConfigError, ModelFolderError, UserError
from core.files import (atomic_file, atomic_folder, check_safetensors, check_state, init_from, load_safetensors, load_state, read_json,
                        recover_folder, require_files, save_png, write_json)

__all__ = ["ConfigError", "ModelFolderError", "UserError", "atomic_file", "atomic_folder", "check_safetensors", "check_state",
           "init_from", "load_safetensors", "load_state", "read_json", "recover_folder", "require_files", "save_png", "write_json"]
