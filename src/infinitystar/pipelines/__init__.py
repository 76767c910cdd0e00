"""The two pipelines and `load`, which opens any model folder (or Hub repo id) with the pipeline its
model_index.json names."""
from infinitystar.pipelines.base import (DEFAULT_MODEL_DIR, ImagePipelineOutput, ModelCard, ModelIndex, Pipeline,
                                         VideoPipelineOutput, load, read_model_index, resolve_model_path)
from infinitystar.pipelines.infinity import InfinityPipeline
from infinitystar.pipelines.infinitystar import InfinityStarPipeline

__all__ = ["load", "Pipeline", "InfinityStarPipeline", "InfinityPipeline", "VideoPipelineOutput",
           "ImagePipelineOutput", "ModelCard", "ModelIndex", "read_model_index", "resolve_model_path",
           "DEFAULT_MODEL_DIR"]
