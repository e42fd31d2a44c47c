"""Training plumbing shared by the three components: config, trainer/strategy, run folders, resume."""
from launch.components import Component, get_component
from launch.config import ConfigError, RunConfig, TrainerConfig, load_config
from launch.images import log_image_grid, make_grid, save_png
from launch.pipeline import GeneratedImage, Pipeline

__all__ = ["Component", "ConfigError", "GeneratedImage", "Pipeline", "RunConfig", "TrainerConfig", "get_component", "load_config",
           "log_image_grid", "make_grid", "save_png"]
