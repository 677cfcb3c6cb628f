"""Test-only: start Megatron-LM's ``megatron.training`` on a CPU machine (gloo).

Not product code: on a GPU machine none of this is needed. Megatron-LM's start-up assumes CUDA
in five places that have nothing to do with the optimizer; each shim below stands in for one
of them and leaves the training loop, the optimizer set-up, the schedules, checkpointing and
logging of Megatron-LM untouched (megatron-core's own CPU needs are
``megatron_md.megatron.cpu_compat``, applied first):

* ``initialize_megatron`` asserts ``torch.cuda.is_available()`` unless ``allow_no_cuda``:
  called with ``allow_no_cuda=True``.
* ``_initialize_distributed`` creates the model-parallel groups only when
  ``torch.cuda.device_count() > 0``: afterwards, the same ``initialize_model_parallel`` call
  (sizes from the args) when they do not exist.
* ``_set_random_seed`` seeds the model-parallel RNG tracker only with a GPU: afterwards,
  ``model_parallel_cuda_manual_seed`` with the seed it computed (cpu_compat's RNG patch makes
  the CPU generator the "CUDA" one).
* ``_compile_dependencies`` runs ``make`` in megatron-core's datasets directory and builds the
  fused CUDA kernels with ``nvcc``: replaced by an import of the dataset helpers the
  megatron-core wheel ships compiled (nothing to compile for CPU kernels).
* (not CUDA: Python) ``typing.override``, imported by Megatron-LM >= 0.19, is 3.12-only: on 3.11
  ``py311/sitecustomize.py`` (on the ``PYTHONPATH`` the tests set) adds it in every interpreter,
  the ranks and the ones Megatron-LM spawns itself.
* ``arguments.get_device_arch_version()`` (asked at TP > 1) reads the CUDA device's compute
  capability: answered 0 (a pre-Blackwell arch: only selects a performance warning).

Usage (each rank, before ``pretrain``): ``apply()``; ``run_script(path, argv)`` does that and
runs a script as ``__main__``.
"""
from __future__ import annotations

import functools
import importlib
import os
import runpy
import sys


def apply() -> None:
    from megatron_md.megatron import cpu_compat

    cpu_compat.apply()
    path = os.environ.get("MEGATRON_LM_PATH")
    if path and path not in sys.path:
        sys.path.append(path)
    init = importlib.import_module("megatron.training.initialize")
    training = importlib.import_module("megatron.training.training")
    arguments = importlib.import_module("megatron.training.arguments")
    if getattr(init, "_md_cpu_shims", False):
        return
    init._md_cpu_shims = True

    original_initialize = training.initialize_megatron

    @functools.wraps(original_initialize)
    def initialize_megatron(*a, **k):
        k["allow_no_cuda"] = True
        return original_initialize(*a, **k)

    training.initialize_megatron = initialize_megatron

    original_distributed = init._initialize_distributed

    @functools.wraps(original_distributed)
    def _initialize_distributed(get_embedding_ranks, get_position_embedding_ranks, *a, **k):
        result = original_distributed(get_embedding_ranks, get_position_embedding_ranks, *a, **k)
        from megatron.core import parallel_state as mpu
        from megatron.training.global_vars import get_args

        if not mpu.model_parallel_is_initialized():
            args = get_args()
            mpu.initialize_model_parallel(
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                args.virtual_pipeline_model_parallel_size,
                context_parallel_size=args.context_parallel_size,
                expert_model_parallel_size=args.expert_model_parallel_size,
                expert_tensor_parallel_size=args.expert_tensor_parallel_size,
                num_distributed_optimizer_instances=args.num_distributed_optimizer_instances,
                order="tp-cp-ep-dp-pp" if not args.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
                get_embedding_ranks=get_embedding_ranks,
                get_position_embedding_ranks=get_position_embedding_ranks,
                create_gloo_process_groups=getattr(args, "enable_gloo_process_groups",
                                                   getattr(args, "use_gloo_process_groups", True)))
        return result

    init._initialize_distributed = _initialize_distributed

    original_seed = init._set_random_seed

    @functools.wraps(original_seed)
    def _set_random_seed(seed_, data_parallel_random_init=False, *a, **k):
        original_seed(seed_, data_parallel_random_init, *a, **k)
        from megatron.core import parallel_state as mpu
        from megatron.core import tensor_parallel

        seed = seed_ + 100 * mpu.get_pipeline_model_parallel_rank()
        if data_parallel_random_init:
            seed += 10 * mpu.get_data_parallel_rank()
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    init._set_random_seed = _set_random_seed

    def _compile_dependencies():
        importlib.import_module("megatron.core.datasets.helpers_cpp")  # shipped compiled in the wheel

    init._compile_dependencies = _compile_dependencies
    if hasattr(arguments, "get_device_arch_version"):
        arguments.get_device_arch_version = lambda: 0
    if os.environ.get("MEGATRON_MD_TEST_PROBE_EVAL"):
        _probe_evaluate(training)


def _probe_evaluate(training) -> None:
    """Test observation, not a shim: wrapped *below* megatron_md's evaluate hook (install() runs
    later and wraps this), it prints whether the schedule-free optimizers are at x (eval mode)
    while Megatron-LM's ``evaluate`` runs."""
    original = training.evaluate

    @functools.wraps(original)
    def evaluate(*a, **k):
        from megatron_md import megatron_lm
        from megatron_md.megatron.builder import hybrid_optimizers

        opt = megatron_lm._State.optimizer() if megatron_lm._State.optimizer is not None else None
        modes = [g["train_mode"] for h in hybrid_optimizers(opt) for o in h._sf_parts() for g in o.param_groups] \
            if opt is not None else []
        print(f"MEGATRON_MD_PROBE evaluate train_mode={modes}", flush=True)
        return original(*a, **k)

    training.evaluate = evaluate


def run_script(path: str, argv: list[str]) -> None:
    """Apply the shims, then run ``path`` as ``__main__`` with ``sys.argv = [path, *argv]``."""
    apply()
    sys.argv = [path, *argv]
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":  # python cpu_megatron_lm.py <script> <flags...> (under torchrun)
    run_script(sys.argv[1], sys.argv[2:])
