"""DeepSpeed's view of megatron-core's parallel state.

DeepSpeed asks an ``mpu`` object for model- and data-parallel groups under names of its own
(``get_model_parallel_*``, ``get_data_parallel_*``); megatron-core's ``parallel_state`` has
the same groups under other names. For the whole model on every rank "model parallel" means
the tensor-parallel group; under the circular pipeline it is the tensor x pipeline group
(:class:`CircularPipelineMPU`).
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


class CircularPipelineMPU(MegatronMPU):
    """The view of a per-stage DeepSpeed engine under the circular pipeline.

    Each pipeline rank runs its own DeepSpeed engine over its stage, so "model parallel" is
    the tensor x pipeline group: DeepSpeed's gradient norm (for clipping) and its overflow
    check (for skipping a step) then span every stage, so all stages clip by the same global
    norm and skip together. The tensor-parallel rank still decides which replicated (not
    tensor-split) parameters are counted, and the rank in the tensor x pipeline group names
    each stage's engine files apart.
    """

    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_world_size():
        return (ps.get_tensor_model_parallel_world_size()
                * ps.get_pipeline_model_parallel_world_size())

    @staticmethod
    def get_model_parallel_rank():
        import torch.distributed as dist

        return dist.get_rank(group=ps.get_model_parallel_group())
