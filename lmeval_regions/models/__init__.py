"""Models: loading (:class:`ModelConfig`), the embedded PyPI models, and where things are
inside a model, found by module structure (never by the model's name).

* :mod:`.embedded` -- Gemma-3-270M / SmolLM2-135M from PyPI, converted once and cached;
* :mod:`.loading` -- :class:`ModelConfig` and :func:`load_model`;
* :mod:`.architecture` -- decoder blocks, MLP down projections, the parameters a region covers;
* :mod:`.module_map` -- q/k/v/o, gate/up/down and norms per block, logical orientation;
* :mod:`.sharding` -- FSDP2 (DTensor ``Shard(0)``) local-shard arithmetic.
"""

from lmeval_regions.models.architecture import (BlockLayout, MlpActivations, block_parameters,
                                                find_layout, find_mlp_activations, init_std,
                                                linear_shape, matrix_kind, named_param,
                                                text_config)
from lmeval_regions.models.embedded import (DEFAULT_MODEL, EMBEDDED, EmbeddedModel, is_embedded,
                                            resolve_pretrained)
from lmeval_regions.models.loading import ModelConfig, load_model, load_skeleton
from lmeval_regions.models.module_map import (ROLES, ModuleMap, Norm, Projection,
                                              find_module_map)

__all__ = ["BlockLayout", "DEFAULT_MODEL", "EMBEDDED", "EmbeddedModel", "MlpActivations",
           "ModelConfig", "ModuleMap", "Norm", "Projection", "ROLES", "block_parameters",
           "find_layout", "find_mlp_activations", "find_module_map", "init_std", "is_embedded",
           "linear_shape", "load_model", "load_skeleton", "matrix_kind", "named_param", "resolve_pretrained",
           "text_config"]
