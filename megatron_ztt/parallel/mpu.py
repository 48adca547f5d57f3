"""DeepSpeed's view of megatron-core's parallel state.

DeepSpeed asks an ``mpu`` object for model- and data-parallel groups under names of its own
(``get_model_parallel_*``, ``get_data_parallel_*``); megatron-core's ``parallel_state`` has
the same groups under other names. "Model parallel" for DeepSpeed means the tensor-parallel
group here: pipeline stages are handled by its pipeline engine's own grid.
"""

from megatron.core import parallel_state as ps


class MegatronMPU:
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_pipeline_model_parallel_world_size = staticmethod(
        ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
