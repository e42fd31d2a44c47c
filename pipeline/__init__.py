"""Text -> images with trained (or converted) parts: the Pipeline, generation bundles and image utilities.

    from pipeline import Pipeline
    pipe = Pipeline.from_pretrained("runs/demo/bundle")
    for image, score in pipe("a small red circle in the top left on a blue background", keep=4)[0]:
        ...
"""
from pipeline.bundle import BundleError, assemble_bundle, check_fit, load_parts
from pipeline.generation import GeneratedImage, Pipeline
from pipeline.images import labelled_grid, make_grid, save_png, to_uint8

__all__ = ["BundleError", "GeneratedImage", "Pipeline", "assemble_bundle", "check_fit", "labelled_grid", "load_parts",
           "make_grid", "save_png", "to_uint8"]
