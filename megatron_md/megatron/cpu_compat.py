"""Run real megatron-core on a CPU-only machine with the torch.distributed *gloo* backend.

megatron-core (0.16.x and later) assumes CUDA everywhere: literal ``device="cuda"`` tensor
factories, ``torch.cuda.current_device()`` as a device argument, CUDA RNG generators,
streams and events, CUDA type names in dtype checks, NCCL-only collectives and a few code paths
that only work with Transformer-Engine/Apex/grouped_gemm installed. This module stands in for
exactly those *device-level* things, in-process; it changes no optimizer or checkpoint logic
of megatron-core (no patch touches ``megatron.core.optimizer`` or
``megatron.core.dist_checkpointing``: ``tests/megatron/test_cpu_compat.py`` checks that
against :func:`targets`), so the tests run the optimizer and checkpoint code a GPU cluster runs.
We use it for the ``tests/megatron`` tier and for CPU smoke runs of the training driver; it is
never needed (and never active) on a GPU machine.

Every patch, and why (details in each function's docstring):

==========================  ==============================================================
``current_device``          ``torch.cuda.current_device()`` → the CPU device (used as a
                            device argument in ~170 places).
``device_remap``            a TorchFunctionMode that maps CUDA device requests to CPU
                            (``device="cuda"``, ``.cuda()``, ``.to("cuda")``), also inside
                            autograd's backward.
``tensor_type``             ``Tensor.type()`` called from ``megatron.*`` reports the CUDA
                            type name (dtype checks written as CUDA type names).
``rng``                     the CUDA RNG primitives (get/set state, ``manual_seed``) act on
                            the CPU default generator; megatron's tracker runs unchanged.
``streams``                 CUDA streams, events and ``synchronize`` become no-ops (CPU work
                            is synchronous).
``no_compile``              TorchDynamo off: ``torch.compile``-d fusions run eagerly instead
                            of building Inductor C++ in every rank.
``grouped_gemm``            pure-torch stand-in for the CUDA-only ``grouped_gemm`` package
                            (legacy GroupedMLP); skipped where megatron-core has no such module.
``sp_torch_norm``           sequence parallelism with the local spec's torch norms, tagged
                            ``sequence_parallel`` as Apex/TE norms are.
``moe_router_without_te``   ``te_general_gemm = None`` when TE is absent (a NameError
                            otherwise; fixed in later megatron-core, then skipped).
``moe_host_splits``         host split sizes of the alltoall dispatcher as numpy arrays
                            (the CUDA→host move is the identity on CPU).
``gloo_uneven_allgather``   all-gather-v on gloo by padding (NCCL accepts unequal sizes).
``fsdp2_cpu_mesh``          megatron-core's FSDP2 wrapper builds its device mesh on the CPU
                            (it asks for ``"cuda"``).
``megatron_fsdp_ordinal``   ``current_device()`` from Megatron-FSDP's modules is the ordinal
                            0 (it formats ``f"cuda:{...}"``; others keep the CPU device).
``megatron_fsdp_cpu_mesh``  Megatron-FSDP's adapter builds its DP × TP meshes on the CPU.
``megatron_fsdp_without_te`` Megatron-FSDP's adapter's ``isinstance(m, (TELinear,))`` with
                            TE absent (``TELinear`` a mock, not a class: a TypeError at TP > 1).
==========================  ==============================================================

Removed, because they changed megatron-core's optimizer or checkpoint logic rather than a
device call: ``distopt_torch_adam`` (``DistributedOptimizer.state_dict``/``load_state_dict``/
``_set_main_param_and_optimizer_states`` for torch-native Adam's per-param ``step``; our
optimizers are checkpointed by megatron_md's own code, ``megatron_md/checkpoint/``, and
megatron-core's torch-Adam fallback is not what clusters run) and ``ckpt_without_psutil``
(``dist_checkpointing``'s async writer; install ``psutil`` to save torch_dist checkpoints).

Usage, once per process, on its main thread, before building models (spawned ranks must call
it themselves; ``megatron_md.testing.spawn.run_group(..., megatron=True)`` does)::

    from megatron_md.megatron import cpu_compat
    cpu_compat.apply()                     # no-op when torch.cuda.is_available()
    cpu_compat.apply(skip={"no_compile"})  # leave a patch out (ablation)
    ...
    cpu_compat.disable()                   # undo everything (tests)
    with cpu_compat.patched(only={"device_remap"}): ...   # scoped: undone on exit

Design:

* Every patch is a named function registered in :data:`PATCHES`; its docstring says what
  megatron-core does on CPU without it and why the replacement is correct.
* Patches *feature-detect* their targets. A megatron-core release that lacks a patched symbol
  (it was renamed, or the bug was fixed) makes that patch *skipped* with a reason (see
  :func:`skipped`) instead of crashing; a partially applied patch is rolled back.
* Every change goes through a recorder, so :func:`disable` restores the exact previous state
  (attribute values, the pushed torch-function mode, logging filters).
* The device remap is one :class:`~torch.overrides.TorchFunctionMode` (the mechanism behind
  ``torch.set_default_device``), pushed on the thread that calls :func:`apply`; it only
  rewrites CUDA device requests, and the CUDA-type-name shim only answers callers that live in
  ``megatron.*``.

Adding a patch: write ``def _patch_x(rec: _Recorder) -> None`` with a docstring, change state
only through ``rec`` (``rec.setattr``, ``rec.on_undo``), call :func:`_require` (or raise
:class:`NotApplicable`) when a target is missing, and register it in :data:`PATCHES`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType, ModuleType, SimpleNamespace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "PATCHES",
    "NotApplicable",
    "Patch",
    "apply",
    "applied",
    "disable",
    "is_device_remap_active",
    "patched",
    "skipped",
    "targets",
]

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")


class NotApplicable(Exception):
    """Raised by a patch whose target is absent (other megatron-core version, package missing)."""


def _require(obj: Any, *names: str) -> None:
    """Raise :class:`NotApplicable` unless ``obj`` has every attribute in ``names``."""
    for name in names:
        if not hasattr(obj, name):
            owner = getattr(obj, "__name__", type(obj).__name__)
            raise NotApplicable(f"{owner} has no attribute {name!r}")


def _import(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`NotApplicable` (e.g. megatron-core not installed)."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise NotApplicable(f"cannot import {module}: {e}") from e


_MISSING = object()


class _Recorder:
    """Applies state changes for one patch and remembers how to revert them."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.targets: list[tuple[Any, str]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, restoring the old value (or absence) on undo."""
        self.targets.append((obj, name))
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING
        if old is _MISSING and hasattr(obj, name) and not isinstance(obj, type):
            old = getattr(obj, name)  # e.g. module attribute provided by __getattr__
        setattr(obj, name, value)

        def undo() -> None:
            if old is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclasses.dataclass(frozen=True)
class Patch:
    """One registered patch: ``fn(recorder)`` applies it; ``requires`` names other patches."""

    name: str
    fn: Callable[[_Recorder], None]
    requires: tuple[str, ...] = ()

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()


# ---------------------------------------------------------------------------------- devices
def _patch_current_device(rec: _Recorder) -> None:
    """``torch.cuda.current_device()`` returns ``torch.device("cpu")``.

    Without it: megatron passes ``torch.cuda.current_device()`` as a device in ~170 places
    (global memory buffer, TP/SP mappings including their autograd backward, DDP grad buffers,
    the distributed optimizer, p2p); on a CPU build the call raises "Torch not compiled with
    CUDA enabled". Returning the CPU *device* (not an ordinal) keeps these calls correct even
    where the device remap mode is not active (other threads), because a device object needs no
    translation.
    """
    _require(torch.cuda, "current_device")
    rec.setattr(torch.cuda, "current_device", lambda: _CPU)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int device is a CUDA ordinal in torch's API.
    return isinstance(device, int) and not isinstance(device, bool)


def _caller_module(depth: int = 1) -> str:
    """``__name__`` of the first frame above ``depth`` that is not torch or this module."""
    frame = sys._getframe(depth + 1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == __name__ or name == "torch" or name.startswith("torch.")):
            return name
        frame = frame.f_back
    return ""


class _CudaToCpuMode(TorchFunctionMode):
    """Torch-function mode that turns CUDA device requests into CPU ones.

    Handles ``device=`` keyword arguments of every torch function (factories, ``Tensor.to``,
    ``new_*``), ``Tensor.to(<cuda device>, ...)`` positionally and ``Tensor.cuda()``. With
    ``fake_cuda_type_names`` set, ``Tensor.type()`` called from ``megatron.*`` reports
    ``torch.cuda.*Tensor`` names for CPU tensors (see :func:`_patch_tensor_type`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fake_cuda_type_names = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.type and self.fake_cuda_type_names and len(args) == 1 and not kwargs:
            name = func(*args)
            if (
                args[0].device.type == "cpu"
                and name.startswith("torch.")
                and _caller_module().startswith("megatron.")
            ):
                name = "torch.cuda." + name[len("torch.") :]
            return name
        return func(*args, **kwargs)


_MODE: _CudaToCpuMode | None = None
_MODE_THREAD: int | None = None


def is_device_remap_active() -> bool:
    """True if the CUDA→CPU device remap mode is active on the calling thread."""
    return _MODE is not None and _MODE in torch.overrides._get_current_function_mode_stack()


def _patch_device_remap(rec: _Recorder) -> None:
    """Map CUDA device requests to CPU: ``device="cuda"|"cuda:N"|N``, ``.to("cuda")``, ``.cuda()``.

    Without it: megatron has dozens of literal CUDA allocations (causal masks, the optimizer's
    ``found_inf`` and grad-scale tensors, clip_grads, the schedules' token counters, rotary
    embeddings without CPU init, ...) which raise on a CPU build. A
    :class:`~torch.overrides.TorchFunctionMode` sees every torch call, so one rule covers all of
    them, including code added in later megatron releases. CPU is the only device in the
    process, so "the current CUDA device" and "the CPU" denote the same memory.

    The mode is pushed on the thread calling :func:`apply` (torch modes are thread-local, like
    ``torch.set_default_device``). Autograd runs backward *inside* the handler of
    ``Tensor.backward`` / ``torch.autograd.backward``, where torch has popped the mode, so
    megatron's custom ``autograd.Function.backward`` code (and activation recompute) would run
    unmapped; we therefore wrap ``torch.autograd._engine_run_backward`` to re-enter the mode.
    """
    global _MODE, _MODE_THREAD
    import torch.autograd as autograd

    _require(torch.overrides, "_get_current_function_mode_stack")
    _require(autograd, "_engine_run_backward")
    mode = _CudaToCpuMode()
    mode.__enter__()
    _MODE, _MODE_THREAD = mode, threading.get_ident()

    def pop_mode() -> None:
        global _MODE, _MODE_THREAD
        stack = torch.overrides._get_current_function_mode_stack()
        if threading.get_ident() != _MODE_THREAD or not stack or stack[-1] is not mode:
            raise RuntimeError(
                "cpu_compat.disable(): the device remap mode is not the innermost torch function "
                "mode on this thread (was another mode pushed after apply(), or is this another "
                "thread?); exit that mode first"
            )
        mode.__exit__(None, None, None)
        _MODE, _MODE_THREAD = None, None

    rec.on_undo(pop_mode)

    run_backward = autograd._engine_run_backward

    def _engine_run_backward(*args, **kwargs):
        if _MODE is None or _MODE in torch.overrides._get_current_function_mode_stack():
            return run_backward(*args, **kwargs)
        with _MODE:
            return run_backward(*args, **kwargs)

    rec.setattr(autograd, "_engine_run_backward", _engine_run_backward)


def _patch_tensor_type(rec: _Recorder) -> None:
    """``tensor.type()`` called from ``megatron.*`` reports ``torch.cuda.<T>Tensor`` for CPU tensors.

    Without it: ``Float16OptimizerWithFloat16Params`` and ``DistributedOptimizer`` raise
    ``TypeError("Wrapped parameters must be one of torch.cuda.FloatTensor, ...")`` because a
    CPU parameter's ``type()`` is ``torch.FloatTensor``; ``clip_grads`` asserts the same. The
    checks only guard the dtype (half/bf16/fp32), which the CUDA name encodes identically.
    Scoped by the caller's module so that other code still sees the true type name.
    """
    if _MODE is None:
        raise NotApplicable("needs the device_remap patch")
    mode = _MODE
    mode.fake_cuda_type_names = True

    def undo() -> None:
        mode.fake_cuda_type_names = False

    rec.on_undo(undo)


# -------------------------------------------------------------------------------------- RNG
def _cpu_get_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def _patch_rng(rec: _Recorder) -> None:
    """The CPU default generator plays the role of the "current CUDA generator".

    Without it: ``CudaRNGStatesTracker.add`` (called by ``model_parallel_cuda_manual_seed``)
    and ``fork`` call ``torch.cuda.get_rng_state`` / megatron's ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state``, which raise on a CPU build, and ``torch.cuda.manual_seed`` is
    silently ignored. On CPU every "device" tensor is drawn from the CPU default generator
    (dropout has no generator argument), so the CUDA RNG primitives are redirected to it:
    get/set state and ``manual_seed``. megatron's own tracker logic then runs unchanged:
    ``model_parallel_cuda_manual_seed(s)`` seeds the default generator with ``s`` (identical
    across TP ranks, as on GPU), the tracker keeps the TP-rank-dependent
    ``model-parallel-rng`` and the ``expert-parallel-rng`` states, and activation recompute
    (``CheckpointFunction``) saves and restores them. ``torch.cuda.manual_seed_all`` (used by
    ``torch.manual_seed``) is left alone.

    ``fork()`` warns "CPU RNG state changed within GPU RNG context" whenever random numbers are
    drawn inside it, which on CPU is every time (the generators are the same); that one
    message is filtered from the ``megatron.core.tensor_parallel.random`` logger.
    """
    mrandom = _import("megatron.core.tensor_parallel.random")
    _require(mrandom, "_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker")
    _require(torch.cuda, "get_rng_state", "set_rng_state", "manual_seed")
    rec.setattr(torch.cuda, "get_rng_state", _cpu_get_rng_state)
    rec.setattr(torch.cuda, "set_rng_state", _cpu_set_rng_state)
    rec.setattr(torch.cuda, "manual_seed", _cpu_manual_seed)
    rec.setattr(mrandom, "_get_cuda_rng_state", _cpu_get_rng_state)
    rec.setattr(mrandom, "_set_cuda_rng_state", _cpu_set_rng_state)
    logger = logging.getLogger(mrandom.__name__)
    flt = _DropMessage("CPU RNG state changed within GPU RNG context")
    logger.addFilter(flt)
    rec.on_undo(lambda: logger.removeFilter(flt))


# -------------------------------------------------------------------------- streams, events
class _NullEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is complete when the call returns."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: a context manager and no-op synchronisation."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


_NULL_STREAM = _NullStream()


def _patch_streams(rec: _Recorder) -> None:
    """CUDA streams, events and ``synchronize`` become no-ops.

    Without it: ``torch.cuda.Stream()``, ``current_stream()``, ``Event()`` and
    ``synchronize()`` raise on a CPU build; megatron uses them in the MoE alltoall dispatcher
    (device-to-host copy stream), DDP's overlapped grad reduce, the distributed optimizer's
    param all-gather, timers and p2p. CPU kernels are synchronous and gloo collectives are
    waited on explicitly, so ordering is already guaranteed; no-ops are exact.
    """
    c = torch.cuda
    for name, value in (
        ("Stream", _NullStream),
        ("Event", _NullEvent),
        ("stream", lambda *a, **k: contextlib.nullcontext()),
        ("current_stream", lambda *a, **k: _NULL_STREAM),
        ("default_stream", lambda *a, **k: _NULL_STREAM),
        ("set_stream", lambda *a, **k: None),
        ("synchronize", lambda *a, **k: None),
    ):
        if hasattr(c, name):
            rec.setattr(c, name, value)


def _patch_no_compile(rec: _Recorder) -> None:
    """Disable TorchDynamo, so ``torch.compile``-decorated megatron functions run eagerly.

    Without it: megatron's ``jit_fuser`` is ``torch.compile`` (bias-GeLU/SwiGLU fusions, MoE
    router helpers such as ``_apply_expert_bias``); on CPU the first call triggers an Inductor
    C++ build (tens of seconds, needs a compiler toolchain) in every spawned rank. The
    decorated functions are pure tensor code, so eager execution computes the same values.
    Note: this is process-wide (it also disables ``torch.compile`` for non-megatron code).
    """
    dynamo_config = _import("torch._dynamo.config")
    _require(dynamo_config, "disable")
    rec.setattr(dynamo_config, "disable", True)


# -------------------------------------------------------------------- missing CUDA packages
def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b=False):
    """Reference ``grouped_gemm.ops.gmm``: row block ``i`` of ``a`` times ``b[i]`` (or ``b[i].T``)."""
    outs, start = [], 0
    for i, n in enumerate(batch_sizes.tolist()):
        w = b[i].t() if trans_b else b[i]
        outs.append(a[start : start + n] @ w)
        start += n
    if not outs:
        return a.new_empty(0, b.shape[1] if trans_b else b.shape[2])
    return torch.cat(outs, dim=0)


def _patch_grouped_gemm(rec: _Recorder) -> None:
    """Pure-torch stand-in for the CUDA-only ``grouped_gemm`` package (legacy ``GroupedMLP``).

    Without it: ``moe_grouped_gemm=True`` with the local spec builds ``GroupedMLP``, which
    asserts that ``grouped_gemm`` is importable. The stand-in computes the same per-expert
    matmuls one expert at a time. Skipped when the real package is installed.
    """
    gg = _import("megatron.core.transformer.moe.grouped_gemm_util")
    _require(gg, "grouped_gemm", "ops")
    if gg.grouped_gemm is not None:
        raise NotApplicable("the grouped_gemm package is installed")
    fake = ModuleType("grouped_gemm")
    fake.ops = SimpleNamespace(gmm=_grouped_gemm)
    rec.setattr(gg, "grouped_gemm", fake)
    rec.setattr(gg, "ops", fake.ops)


def _patch_sp_torch_norm(rec: _Recorder) -> None:
    """Sequence parallelism with the *local* spec: plain torch norms tagged ``sequence_parallel``.

    Without it: without Apex/TE the local spec's norm is ``WrappedTorchNorm``, which asserts
    ``not config.sequence_parallel``. Under SP a norm is applied to each rank's sequence slice
    with replicated weights, exactly like Apex ``FusedLayerNorm``/``TENorm``; what those add is
    the ``sequence_parallel=True`` attribute on the weights, by which ``finalize_model_grads``
    all-reduces their grads over the TP group. We build the torch norm and set that attribute.
    """
    torch_norm = _import("megatron.core.transformer.torch_norm")
    _require(torch_norm, "WrappedTorchNorm")
    cls = torch_norm.WrappedTorchNorm
    original_new = cls.__dict__.get("__new__")
    if original_new is None:
        raise NotApplicable("WrappedTorchNorm defines no __new__")
    original_new = original_new.__func__ if isinstance(original_new, staticmethod) else original_new

    def __new__(klass, config, hidden_size, *args, **kwargs):
        sequence_parallel = getattr(config, "sequence_parallel", False)
        if sequence_parallel:
            config = copy.copy(config)
            object.__setattr__(config, "sequence_parallel", False)
        norm = original_new(klass, config, hidden_size, *args, **kwargs)
        if sequence_parallel:
            for p in norm.parameters():
                p.sequence_parallel = True
        return norm

    rec.setattr(cls, "__new__", staticmethod(__new__))


def _patch_moe_router_without_te(rec: _Recorder) -> None:
    """Define ``moe_utils.te_general_gemm = None`` when Transformer-Engine is absent.

    Without it: ``moe_utils`` imports ``te_general_gemm`` only inside ``try: import
    transformer_engine``, but ``RouterGatingLinearFunction`` tests ``te_general_gemm is not
    None`` unconditionally, so every MoE forward raises ``NameError`` without TE (a
    megatron-core bug, not CPU-specific). ``None`` selects its documented torch fallback.
    """
    moe_utils = _import("megatron.core.transformer.moe.moe_utils")
    if hasattr(moe_utils, "te_general_gemm"):
        raise NotApplicable("moe_utils.te_general_gemm is defined")
    _require(moe_utils, "RouterGatingLinearFunction")
    rec.setattr(moe_utils, "te_general_gemm", None)


def _patch_moe_host_splits(rec: _Recorder) -> None:
    """MoE alltoall dispatcher: split sizes that are already on the host become numpy arrays.

    Without it: the dispatcher converts its token split sizes with
    ``maybe_move_tensor_to_cpu(t, as_numpy=True)``, which only acts on CUDA tensors; CPU
    tensors stay tensors, and ``all_to_all_single`` rejects tensor split sizes
    ("incompatible function arguments"). For a CPU tensor the device move is the identity, so
    the correct result is just the numpy conversion.
    """
    moe_utils = _import("megatron.core.transformer.moe.moe_utils")
    dispatcher = _import("megatron.core.transformer.moe.token_dispatcher")
    _require(moe_utils, "maybe_move_tensor_to_cpu")
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    rec.setattr(moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    if getattr(dispatcher, "maybe_move_tensor_to_cpu", None) is original:
        rec.setattr(dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


# ------------------------------------------------------------------------------------ gloo
class _CompletedWork:
    """``Work`` handle for an operation that already finished synchronously."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True


def _patch_gloo_uneven_allgather(rec: _Recorder) -> None:
    """``dist.all_gather`` into differently sized tensors on gloo (all-gather-v) by padding.

    Without it: gloo rejects an output list of unequal sizes ("invalid tensor size"), which
    NCCL accepts; megatron's all-gather-v (``_gather_along_first_dim`` with
    ``output_split_sizes``, used by the MoE alltoall dispatcher when expert-TP > 1) relies on
    it. Each rank pads its flattened input to the largest output numel, the padded buffers are
    all-gathered, and each output receives the unpadded prefix of its rank's buffer: the same
    bytes the uneven collective would deliver. Equal sizes and non-gloo groups take the
    original path.
    """
    import torch.distributed as dist

    _require(dist, "all_gather", "get_backend")
    original = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if all(t.shape == tensor.shape for t in tensor_list) or dist.get_backend(group) != "gloo":
            return original(tensor_list, tensor, group=group, async_op=async_op)
        n = max(t.numel() for t in tensor_list)
        send = tensor.new_zeros(n)
        send[: tensor.numel()] = tensor.reshape(-1)
        recv = [torch.empty_like(send) for _ in tensor_list]
        original(recv, send, group=group)
        for out, buf in zip(tensor_list, recv):
            out.copy_(buf[: out.numel()].view_as(out))
        return _CompletedWork() if async_op else None

    rec.setattr(dist, "all_gather", all_gather)


def _patch_fsdp2_cpu_mesh(rec: _Recorder) -> None:
    """megatron-core's ``TorchFullyShardedDataParallel`` builds its mesh on the CPU device.

    Without it: the wrapper calls ``DeviceMesh.from_group(group, "cuda")`` (the device type is a
    literal), and FSDP2's ``fully_shard`` then fails on a machine without CUDA (``TypeError:
    device(): argument 'index' must be int, not torch.device`` in ``_fsdp_init``). The module's
    ``DeviceMesh`` name is replaced by a stand-in whose ``from_group`` maps the device type
    ``"cuda"`` to ``"cpu"``: the same group, a CPU mesh, gloo collectives. Nothing else of the class
    changes.
    """
    _cpu_mesh_in(rec, "megatron.core.distributed.torch_fully_sharded_data_parallel")


def _cpu_mesh_in(rec: _Recorder, module: str) -> None:
    """``module.DeviceMesh`` → a stand-in whose ``from_group`` maps the device type ``"cuda"`` to ``"cpu"``."""
    mod = _import(module)
    _require(mod, "DeviceMesh")
    real = mod.DeviceMesh

    class _CpuDeviceMesh:
        @staticmethod
        def from_group(group, device_type, *args, **kwargs):
            return real.from_group(group, "cpu" if _is_cuda_device(device_type) else device_type, *args, **kwargs)

    rec.setattr(mod, "DeviceMesh", _CpuDeviceMesh)


def _patch_megatron_fsdp_cpu_mesh(rec: _Recorder) -> None:
    """Megatron-FSDP's adapter builds its DP × TP meshes on the CPU device.

    Without it: ``FullyShardedDataParallel._init_dist_index`` calls ``DeviceMesh.from_group(...,
    device_type="cuda")`` (a literal). The meshes build, but anything that derives a mesh from them — a
    flattened DP × TP mesh, e.g. Megatron-FSDP's own ``gather_uneven_dtensor_to_full_tensor`` — calls
    ``torch.cuda.set_device`` and fails on a CPU build (``module 'torch._C' has no attribute
    '_cuda_setDevice'``). As ``fsdp2_cpu_mesh``: the same groups, CPU meshes, gloo collectives.
    """
    _cpu_mesh_in(rec, "megatron.core.distributed.fsdp.mcore_fsdp_adapter")


_MEGATRON_FSDP_MODULES = ("megatron.core.distributed.fsdp.src.megatron_fsdp.", "megatron_fsdp.")


def _patch_megatron_fsdp_ordinal(rec: _Recorder) -> None:
    """``torch.cuda.current_device()`` called from Megatron-FSDP's own modules answers the ordinal 0.

    Without it: ``MegatronFSDP.__init__`` builds ``torch.device(f"cuda:{torch.cuda.current_device()}")``
    to compare with the device it was given (``megatron_fsdp.py``; megatron-core 0.16.1 line 184), which
    with the ``current_device`` patch's CPU device is the string ``"cuda:cpu"`` (``RuntimeError: Invalid
    device string``). Megatron-FSDP's callers get what a one-GPU-per-rank machine gives them, a device
    ordinal (every other caller still gets the CPU device); a ``cuda:0`` device object needs no CUDA, and
    tensors it asks for on device ``0`` are mapped to the CPU by ``device_remap``, as every CUDA request.
    """
    current = torch.cuda.current_device

    def current_device():
        if _caller_module().startswith(_MEGATRON_FSDP_MODULES):
            return 0
        return current()

    rec.setattr(torch.cuda, "current_device", current_device)


def _patch_megatron_fsdp_without_te(rec: _Recorder) -> None:
    """Megatron-FSDP's adapter checks ``isinstance(module, (TELinear,))``, where ``TELinear`` is not a
    class when Transformer Engine is absent (megatron-core derives it from a ``MagicMock`` stand-in of
    ``te``, which makes it a mock object).

    Without it: at tensor-parallel size > 1, ``FullyShardedDataParallel._fix_tensor_parallel_attributes``
    raises ``TypeError: isinstance() arg 2 must be a type`` for the first non-expert parameter
    (megatron-core 0.16.1, ``mcore_fsdp_adapter.py`` line 184). The adapter's ``TELinear`` name becomes a
    class that no module is an instance of — what the check means without TE: no module is a TE
    linear. Skipped where TE is installed (the name is TE's class).
    """
    mod = _import("megatron.core.distributed.fsdp.mcore_fsdp_adapter")
    _require(mod, "TELinear")
    if isinstance(mod.TELinear, type):
        raise NotApplicable("TELinear is a class (Transformer Engine is installed)")

    class _NoTELinear:
        """Transformer Engine is not installed: nothing is a TE linear."""

    rec.setattr(mod, "TELinear", _NoTELinear)


# ---------------------------------------------------------------------------------- registry
PATCHES: Mapping[str, Patch] = MappingProxyType(
    {
        p.name: p
        for p in (
            Patch("current_device", _patch_current_device),
            Patch("device_remap", _patch_device_remap),
            Patch("tensor_type", _patch_tensor_type, requires=("device_remap",)),
            Patch("rng", _patch_rng),
            Patch("streams", _patch_streams),
            Patch("no_compile", _patch_no_compile),
            Patch("grouped_gemm", _patch_grouped_gemm),
            Patch("sp_torch_norm", _patch_sp_torch_norm),
            Patch("moe_router_without_te", _patch_moe_router_without_te),
            Patch("moe_host_splits", _patch_moe_host_splits),
            Patch("gloo_uneven_allgather", _patch_gloo_uneven_allgather),
            Patch("fsdp2_cpu_mesh", _patch_fsdp2_cpu_mesh),
            Patch("megatron_fsdp_ordinal", _patch_megatron_fsdp_ordinal, requires=("current_device", "device_remap")),
            Patch("megatron_fsdp_without_te", _patch_megatron_fsdp_without_te),
            Patch("megatron_fsdp_cpu_mesh", _patch_megatron_fsdp_cpu_mesh),
        )
    }
)
"""All patches in application order, by name."""

_APPLIED: dict[str, _Recorder] = {}
_SKIPPED: dict[str, str] = {}
_LOCK = threading.RLock()


def _check_names(names: Iterable[str], arg: str) -> set[str]:
    names = {names} if isinstance(names, str) else set(names)
    unknown = names - PATCHES.keys()
    if unknown:
        raise ValueError(f"{arg}: unknown patch name(s) {sorted(unknown)}; known: {list(PATCHES)}")
    return names


def apply(skip: Iterable[str] = (), only: Iterable[str] | None = None) -> list[str]:
    """Apply the CPU patches (idempotent) and return the names of all applied patches.

    Does nothing when CUDA is available. ``skip`` leaves patches out; ``only`` restricts to
    the given names. A patch whose target is missing in the installed megatron-core/torch is
    recorded in :func:`skipped` instead of raising; any other error propagates after the
    partial patch was rolled back.
    """
    skip = _check_names(skip, "skip")
    only = None if only is None else _check_names(only, "only")
    if torch.cuda.is_available():
        return []
    with _LOCK:
        for name, patch in PATCHES.items():
            if name in _APPLIED or name in skip or (only is not None and name not in only):
                continue
            missing = [r for r in patch.requires if r not in _APPLIED]
            if missing:
                _SKIPPED[name] = f"requires {missing}"
                continue
            rec = _Recorder()
            try:
                patch.fn(rec)
            except NotApplicable as e:
                rec.undo()
                _SKIPPED[name] = str(e)
                log.debug("cpu_compat: skipped %s: %s", name, e)
                continue
            except BaseException:
                rec.undo()
                raise
            _SKIPPED.pop(name, None)
            _APPLIED[name] = rec
        return applied()


def targets() -> dict[str, list[str]]:
    """For each applied patch, the ``module.attribute`` / ``module.Class.attribute`` names it
    replaced (what ``tests/megatron/test_cpu_compat.py`` checks against megatron-core's optimizer
    and checkpoint code)."""
    def describe(obj: Any, name: str) -> str:
        if isinstance(obj, ModuleType):
            return f"{obj.__name__}.{name}"
        if isinstance(obj, type):
            return f"{obj.__module__}.{obj.__qualname__}.{name}"
        return f"{type(obj).__module__}.{type(obj).__qualname__}().{name}"

    with _LOCK:
        return {n: [describe(o, a) for o, a in rec.targets] for n, rec in _APPLIED.items()}


def applied() -> list[str]:
    """Names of the patches currently applied, in application order."""
    return list(_APPLIED)


def skipped() -> dict[str, str]:
    """Patches that :func:`apply` did not apply because they did not fit, with the reason."""
    return dict(_SKIPPED)


@contextlib.contextmanager
def patched(skip: Iterable[str] = (), only: Iterable[str] | None = None):
    """``with patched(...) as names:`` applies patches and undoes, on exit, those it applied."""
    before = set(applied())
    names = apply(skip=skip, only=only)
    try:
        yield names
    finally:
        disable([n for n in names if n not in before])


def disable(names: Iterable[str] | None = None) -> list[str]:
    """Undo applied patches (all, or ``names``) in reverse order; returns the undone names.

    Undoing ``device_remap`` must happen on the thread that applied it, with no other torch
    function mode pushed on top of it. Patches that require an undone patch are undone too.
    """
    with _LOCK:
        targets = set(_APPLIED) if names is None else _check_names(names, "names") & set(_APPLIED)
        changed = True
        while changed:  # close over dependents
            changed = False
            for name in _APPLIED:
                if name not in targets and any(r in targets for r in PATCHES[name].requires):
                    targets.add(name)
                    changed = True
        undone = []
        for name in reversed(list(_APPLIED)):
            if name in targets:
                _APPLIED[name].undo()
                del _APPLIED[name]
                undone.append(name)
        return undone
