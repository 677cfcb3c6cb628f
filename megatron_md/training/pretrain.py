"""The training loop of the Megatron-Core driver (``examples/pretrain_gpt.py``, ``pretrain_moe.py``).

``main(argv)`` parses and validates the flags (usage errors exit with code 2 before anything
is built), then :func:`pretrain` initialises the process groups, builds GPTModel + DDP, our
optimizer (:func:`megatron_md.megatron.builder.get_megatron_optimizer`) and Megatron's
``OptimizerParamScheduler`` (stepped once per successful iteration; warmup and decay in
iterations), the GPTDataset data, and runs Megatron's ``get_forward_backward_func()`` schedule
with ``finalize_model_grads`` as the config's grad-finalisation hook.

``--overlap-grad-reduce`` / ``--overlap-param-gather`` are wired as Megatron-LM's ``train()``
wires them (:func:`_set_sync_funcs`, :class:`~megatron_md.training.model.ParamGatherHooks`):
the schedule's ``no_sync_func`` / ``grad_sync_func`` / ``param_sync_func``, the forward pre-hooks
off for the first iteration and during evaluation, and the weights all-gathered before anything
reads them after a step (evaluation, the optimizer telemetry, checkpoint saves, schedule-free
x/y swaps). Every optimizer and DP mode gives the losses and weights of the same run without
overlap (``tests/megatron/test_overlap.py``).

Every ``--log-interval`` iterations rank 0 prints iteration, loss (mean over the interval),
LR, tokens/s, grad norm and skipped steps (and the MoE load-balancing loss), and writes them to
TensorBoard with ``--tensorboard-dir`` when ``tensorboard`` is installed. Every
``--eval-interval`` iterations and at the end it evaluates ``--eval-iters`` fixed validation
batches (schedule-free optimizers are swapped to their averaged iterate ``x`` for evaluation
and back afterwards). Checkpoints: :mod:`megatron_md.checkpoint`.

The last line printed by rank 0 is a JSON object ``{"event": "summary", ...}`` with the final
train loss (mean of the last logging interval), the final validation loss, the iteration
count, skipped steps and the loss histories, for wrappers that build tables.
"""
from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from functools import partial
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .arguments import ArgumentError, build_parser, optimizer_config, parse_with_recipe, validate_args
from ..errors import DivergenceError, RunError

__all__ = ["main", "pretrain", "SUMMARY_EVENT"]

SUMMARY_EVENT = "summary"


def _print0(*a, **kw) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


# ------------------------------------------------------------------------------- forward step
def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses over unmasked tokens; Megatron divides by the token count."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.stack([loss.clone().detach(), num_tokens.float()])
    return loss, num_tokens, {"lm loss": report}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _reduce_losses(losses_reduced) -> float:
    """Token-weighted mean over micro-batches and data-parallel ranks; with pipeline
    parallelism the last stage computes it and every stage receives it."""
    from megatron.core import parallel_state as ps
    total = torch.zeros(2, dtype=torch.float64)
    for d in losses_reduced:
        total += d["lm loss"].detach().to("cpu", torch.float64)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    total = total.to(dev)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def _data_iterators(model, dataset, args, start: int, count: Optional[int] = None):
    """One iterator for a single model chunk; one per chunk (the same batches) for the
    interleaved schedule, whose first/last virtual stages read tokens/labels."""
    from .data import batch_iterator
    if len(model) == 1:
        return batch_iterator(dataset, args, start, count)
    return [batch_iterator(dataset, args, start, count) for _ in model]


def _moe_aux_loss(args) -> Optional[float]:
    """Mean load-balancing loss per MoE layer over this iteration (DP-averaged); clears the tracker."""
    if not args.num_experts:
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe import moe_utils
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    out = None
    for name, entry in tracker.items():
        if "load_balancing" not in name:
            continue
        v = entry["values"].detach().clone().float()
        dist.all_reduce(v, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:  # each stage holds its own layers' values
            dist.all_reduce(v, group=ps.get_pipeline_model_parallel_group())
        out = (v.sum() / (args.num_layers * ps.get_data_parallel_world_size() * args.num_microbatches)).item()
    moe_utils.clear_aux_losses_tracker()
    return out


def _check_loss(args, iteration: int, loss: float, recent, last_saved) -> None:
    """Stop (before this iteration's checkpoint) on a non-finite loss or a spike: a loss above
    ``--loss-spike-factor`` times the mean of the previous ``--loss-spike-window`` iterations.
    ``loss`` is the same on every rank, so every rank stops together."""
    where = (f"the last checkpoint is iteration {last_saved} in {args.save}" if last_saved is not None
             else "no checkpoint was written by this run")
    if args.check_for_nan_in_loss_and_grad and not math.isfinite(loss):
        raise DivergenceError(f"iteration {iteration}: the loss is {loss} — stopping before saving ({where}). "
                              "Lower --lr or raise --lr-warmup-iters; --no-check-for-nan-in-loss-and-grad "
                              "disables this check")
    factor = args.loss_spike_factor
    if factor and len(recent) == recent.maxlen and math.isfinite(loss):
        mean = sum(recent) / len(recent)
        if mean > 0 and loss > factor * mean:
            raise DivergenceError(
                f"iteration {iteration}: the loss {loss:.4g} is {loss / mean:.1f}x the mean {mean:.4g} of the previous "
                f"{len(recent)} iterations (--loss-spike-factor {factor:g}, --loss-spike-window {recent.maxlen}) — "
                f"stopping before saving ({where}). Lower --lr, or pass --loss-spike-factor 0 to disable this check")


def _canonical_lr(optimizer) -> float:
    groups = optimizer.param_groups
    for g in groups:
        if g.get("default_config"):
            return g["lr"]
    return groups[0]["lr"] if groups else 0.0


def _set_sync_funcs(args, config, model) -> None:
    """The schedule's DDP hooks, as Megatron-LM sets them (``align_grad_reduce`` on, its default).

    With ``--overlap-grad-reduce``: ``no_sync_func`` (no bucket is reduced before the last
    micro-batch's backward) and ``grad_sync_func`` (pipeline schedules start each chunk's
    reduction themselves: after its last backward under the interleaved schedule, on the later
    stages at the end); with aligned param gathering (``--overlap-param-gather`` under the
    interleaved schedule) ``param_sync_func`` (the schedule starts each chunk's all-gather).
    ``finalize_model_grads`` waits for the reductions (or runs them, without overlap)."""
    from megatron.core.distributed import finalize_model_grads

    from .model import align_param_gather

    def per_chunk(name: str):
        funcs = [getattr(c, name) for c in model]
        return funcs[0] if len(funcs) == 1 else funcs

    if args.overlap_grad_reduce:
        config.no_sync_func = per_chunk("no_sync")
        config.grad_sync_func = per_chunk("start_grad_sync")
    if align_param_gather(args):
        config.param_sync_func = per_chunk("start_param_sync")
    config.finalize_model_grads_func = finalize_model_grads


def _release(config) -> None:
    """Drop the config's references to the model and the optimizer at the end of a run.

    ZeRO-1 shards of fp32 weights are views of the model parameters, so their autograd history
    leads to the parameters' grad accumulators, whose DDP backward hooks reach the model and,
    through ``config.grad_scale_func``, the optimizer again: a cycle through C++ that Python's
    collector cannot free, which kept every run's process groups (and their threads) alive in a
    process that trains several times, e.g. the tests."""
    for name in ("no_sync_func", "grad_sync_func", "param_sync_func", "finalize_model_grads_func", "grad_scale_func"):
        setattr(config, name, None)


# ------------------------------------------------------------------------------- evaluation
def evaluate(args, model, optimizer, valid_ds, fwd_bwd) -> float:
    """Validation loss over ``--eval-iters`` fixed batches. The caller makes the weights
    current first (``ParamGatherHooks.paused`` with ``--overlap-param-gather``)."""
    from megatron.core.transformer.moe import moe_utils

    from ..megatron.builder import swap_to_eval, swap_to_train
    for c in model:
        c.eval()
    swap_to_eval(optimizer, model)
    reports = []
    try:
        it = _data_iterators(model, valid_ds, args, 0, args.eval_iters)
        with torch.no_grad():
            for _ in range(args.eval_iters):
                reports += fwd_bwd(forward_step_func=_forward_step, data_iterator=it, model=model,
                                   num_microbatches=args.num_microbatches, seq_length=args.seq_length,
                                   micro_batch_size=args.micro_batch_size, forward_only=True)
    finally:
        swap_to_train(optimizer, model)
        for c in model:
            c.train()
        if args.num_experts:
            moe_utils.clear_aux_losses_tracker()
    return _reduce_losses(reports)


def _tensorboard(args):
    if args.tensorboard_dir is None or dist.get_rank() != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # noqa: BLE001 - optional dependency
        _print0(f"[info] --tensorboard-dir given but tensorboard is not importable ({exc}); "
                "not writing TensorBoard logs (pip install 'megatron_md[tensorboard]')")
        return None
    return SummaryWriter(log_dir=args.tensorboard_dir, max_queue=100)


# ------------------------------------------------------------------------------- the run
def pretrain(args) -> dict:
    """Train as configured by validated ``args``; returns the summary dict (printed by rank 0)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..megatron.builder import get_megatron_optimizer, skipped_steps
    from .. import checkpoint
    from .data import build_datasets
    from .model import ParamGatherHooks, build_model, initialize, shutdown, sync_params, transformer_config
    from .telemetry import JsonlLog, OptimizerTelemetry

    t_start = time.perf_counter()
    created = initialize(args)
    writer = runlog = config = None
    try:
        _print0(f"> world {args.world_size}: TP {args.tensor_model_parallel_size}, PP {args.pipeline_model_parallel_size}"
                + (f" (x{args.virtual_pipeline_model_parallel_size} virtual)" if args.virtual_pipeline_model_parallel_size else "")
                + f", "
                f"EP {args.expert_model_parallel_size}, DP {args.data_parallel_size}; backend "
                f"{args.distributed_backend}; transformer-impl {args.transformer_impl}; "
                f"{'bf16' if args.bf16 else 'fp16' if args.fp16 else 'fp32'}"
                + (f"; fp8 {args.fp8_format}" if args.fp8_format else "")
                + f"; optimizer {args.optimizer}")
        config = transformer_config(args)
        model = build_model(args, config)
        n_local = sum(getattr(p, "_local_tensor", p).numel() for c in model for p in c.parameters())  # FSDP2: its rows
        _print0(f"> GPTModel{' (MoE, %d experts, top-%d, %s dispatcher)' % (args.num_experts, args.moe_router_topk, args.moe_token_dispatcher_type) if args.num_experts else ''}: "
                f"{args.num_layers} layers, hidden {args.hidden_size}, heads {args.num_attention_heads}, "
                f"seq {args.seq_length}, vocab {args.vocab_size} (padded {args.padded_vocab_size}); "
                f"{n_local:,} parameters on rank 0")
        optimizer = get_megatron_optimizer(optimizer_config(args), model, args.md)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
            lr_decay_steps=args.lr_decay_iters, lr_decay_style=args.lr_decay_style,
            start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=max(1, args.train_iters),
            wd_incr_style="constant")
        _set_sync_funcs(args, config, model)
        config.grad_scale_func = optimizer.scale_loss

        iteration, extra = 0, {}
        imported = None
        if args.load_hf is not None:
            from ..checkpoint.hf_import import import_record, load_into, read_config
            t0 = time.perf_counter()
            n = load_into(model, args.load_hf, args.padded_vocab_size)
            optimizer.reload_model_params()   # fp32 master weights / MD's factored gains from the imported ones
            imported = {"to_md": import_record(args.load_hf, read_config(args.load_hf))}
            _print0(f"> initialized from the Hugging Face model {args.load_hf} ({n:,} elements on rank 0, "
                    f"{time.perf_counter() - t0:.1f}s)")
        if args.load is not None:
            t0 = time.perf_counter()
            got = checkpoint.load_checkpoint(args.load, model, optimizer, scheduler, args,
                                                iteration=args.ckpt_step, load_optim=not args.no_load_optim,
                                                load_rng=not args.no_load_rng)
            if got is None:
                _print0(f"> --load {args.load}: no checkpoint there; starting from scratch")
            else:
                iteration, extra = got["iteration"], got["extra"]
                _print0(f"> loaded checkpoint of iteration {got['checkpoint_iteration']} from {args.load} "
                        + ("(model weights only: fresh optimizer, iteration 0) " if args.no_load_optim else "")
                        + f"(integrity verified) in {time.perf_counter() - t0:.1f}s")
        history = {"train": dict(extra.get("train", {})), "valid": dict(extra.get("valid", {}))}
        skipped = int(extra.get("skipped", 0))

        t0 = time.perf_counter()
        train_ds, valid_ds = build_datasets(args)
        _print0(f"> data: {'mock' if args.mock_data else args.data_path}: {len(train_ds):,} train samples"
                + (f", {len(valid_ds):,} validation samples" if valid_ds is not None else "")
                + f" of {args.seq_length} tokens (built in {time.perf_counter() - t0:.1f}s)")
        writer = _tensorboard(args)
        runlog = JsonlLog(args.log_jsonl)
        stats = OptimizerTelemetry(args, model, optimizer) if args.log_optimizer_stats_interval else None
        fwd_bwd = get_forward_backward_func()
        last_it = min(args.train_iters, args.exit_interval or args.train_iters)
        train_iter = _data_iterators(model, train_ds, args, iteration)
        tokens_per_iter = args.global_batch_size * args.seq_length
        acc_loss = acc_n = 0.0
        acc_gn, acc_gn_n, acc_aux, acc_aux_n = 0.0, 0, 0.0, 0
        t_interval, it_interval = time.perf_counter(), 0
        t_train = time.perf_counter()
        it_done = 0
        last_saved = last_eval = None
        val_loss = None
        recent_losses = collections.deque(maxlen=args.loss_spike_window)
        hooks = ParamGatherHooks(model, config)
        hooks.start()
        buckets = sum(len(getattr(c, "bucket_groups", ())) + len(getattr(c, "expert_parallel_bucket_groups", ()))
                      for c in model)
        _print0(f"> training iterations {iteration + 1}..{last_it} (global batch {args.global_batch_size} = "
                f"{args.num_microbatches} x {args.micro_batch_size} x DP {args.data_parallel_size}; "
                f"{tokens_per_iter} tokens/iteration; "
                + ("FSDP2: parameters, gradients and optimizer state sharded by rows over DP"
                   if args.use_torch_fsdp2 else
                   "Megatron-FSDP: parameters, gradients and optimizer state sharded in row-aligned buckets over DP"
                   if args.use_megatron_fsdp else f"{buckets} gradient bucket(s) on rank 0")
                + (", reduced during backward" if args.overlap_grad_reduce else "")
                + (", parameters gathered during forward" if args.overlap_param_gather else "")
                + f") — setup {time.perf_counter() - t_start:.1f}s")

        while iteration < last_it:
            for c in model:
                c.zero_grad_buffer()
            optimizer.zero_grad()
            reports = fwd_bwd(forward_step_func=_forward_step, data_iterator=train_iter, model=model,
                              num_microbatches=args.num_microbatches, seq_length=args.seq_length,
                              micro_batch_size=args.micro_batch_size, forward_only=False)
            stats_due = stats is not None and stats.due(iteration + 1)
            if stats_due:
                t_stats, stats_lr = time.perf_counter(), _canonical_lr(optimizer)
                stats.before_step()
            ok, grad_norm, _ = optimizer.step()
            hooks.after_step(ok)
            if stats_due:
                rec = stats.after_step(iteration + 1, ok, stats_lr)
                if rec is not None:
                    _print0(stats.format_line(rec))
                    runlog.write(rec)
                    if writer is not None:
                        stats.write_tensorboard(writer, rec)
                t_interval += time.perf_counter() - t_stats  # telemetry is not training throughput
            if ok:
                scheduler.step(increment=1)
            else:
                skipped += 1
            iteration += 1
            it_done += 1
            loss = _reduce_losses(reports)
            _check_loss(args, iteration, loss, recent_losses, last_saved)
            recent_losses.append(loss)
            aux = _moe_aux_loss(args)
            acc_loss += loss
            acc_n += 1
            if grad_norm is not None and math.isfinite(grad_norm):
                acc_gn += grad_norm
                acc_gn_n += 1
            if aux is not None:
                acc_aux += aux
                acc_aux_n += 1
            it_interval += 1

            if iteration % args.log_interval == 0 or iteration == last_it:
                dt = time.perf_counter() - t_interval
                mean_loss = acc_loss / acc_n
                lr = _canonical_lr(optimizer)
                gn = acc_gn / acc_gn_n if acc_gn_n else float("nan")
                tps = it_interval * tokens_per_iter / dt
                history["train"][iteration] = mean_loss
                line = (f" iteration {iteration:>7}/{args.train_iters} | ms/iter {1000 * dt / it_interval:8.1f} | "
                        f"tokens/s {tps:8.0f} | lr {lr:.4e} | loss {mean_loss:.4f} | grad norm {gn:.3f} | "
                        f"skipped {skipped}")
                if acc_aux_n:
                    line += f" | moe aux loss {acc_aux / acc_aux_n:.4f}"
                _print0(line)
                runlog.write({"event": "train", "iteration": iteration, "loss": mean_loss, "lr": lr, "grad_norm": gn,
                              "tokens_per_s": tps, "skipped": skipped,
                              **({"moe_aux_loss": acc_aux / acc_aux_n} if acc_aux_n else {})})
                if writer is not None:
                    for k, v in (("lm loss", mean_loss), ("learning-rate", lr), ("grad-norm", gn),
                                 ("tokens-per-second", tps), ("skipped-iterations", skipped)):
                        writer.add_scalar(k, v, iteration)
                    if acc_aux_n:
                        writer.add_scalar("moe aux loss", acc_aux / acc_aux_n, iteration)
                acc_loss = acc_n = 0.0
                acc_gn, acc_gn_n, acc_aux, acc_aux_n = 0.0, 0, 0.0, 0
                t_interval, it_interval = time.perf_counter(), 0

            if valid_ds is not None and (iteration % args.eval_interval == 0 or iteration == last_it):
                t0 = time.perf_counter()
                with hooks.paused():
                    val_loss = evaluate(args, model, optimizer, valid_ds, fwd_bwd)
                history["valid"][iteration] = val_loss
                last_eval = iteration
                _print0(f" validation at iteration {iteration}: lm loss {val_loss:.4f} | ppl "
                        f"{math.exp(min(val_loss, 50)):.2f} ({time.perf_counter() - t0:.1f}s)")
                runlog.write({"event": "valid", "iteration": iteration, "loss": val_loss})
                if writer is not None:
                    writer.add_scalar("lm loss validation", val_loss, iteration)
                t_interval += time.perf_counter() - t0  # evaluation is not training throughput

            if args.save and ((args.save_interval and iteration % args.save_interval == 0) or iteration == last_it):
                t0 = time.perf_counter()
                sync_params(model)  # the saved weights are the updated ones on every rank
                checkpoint.save_checkpoint(args.save, iteration, model, optimizer, scheduler, args,
                                              extra={"train": history["train"], "valid": history["valid"],
                                                     "skipped": skipped})
                last_saved = iteration
                _print0(f" saved checkpoint of iteration {iteration} to {args.save} ({time.perf_counter() - t0:.1f}s)")
                t_interval += time.perf_counter() - t0

        if (args.save and it_done == 0 and last_saved is None and (iteration > 0 or imported)
                and os.path.abspath(args.save) != os.path.abspath(args.load or "")):
            # nothing left to train after --load (--load-hf): write the loaded state at this run's layout
            # and format (what `tools/convert_checkpoint.py reshard` and `from-hf` run); an import is
            # marked weights-only, resumed with --no-load-optim (MD: --md-init factor)
            t0 = time.perf_counter()
            if args.export_sf_x:   # sf-to-x: the averaged weights x, without the optimizer state
                from ..checkpoint.sf import sf_x_optim
                from ..megatron.builder import swap_to_eval, swap_to_train
                swap_to_eval(optimizer, model)
                try:
                    checkpoint.save_checkpoint(args.save, iteration, model, None, scheduler, args,
                                               extra={"converted": f"sf-to-x of {args.load}"},
                                               topology_extra={"optim": sf_x_optim(args.optimizer)})
                finally:
                    swap_to_train(optimizer, model)
            else:
                checkpoint.save_checkpoint(args.save, iteration, model, optimizer, scheduler, args,
                                           extra={"train": history["train"], "valid": history["valid"],
                                                  "skipped": skipped}, topology_extra=imported)
            last_saved = iteration
            _print0(f" saved checkpoint of iteration {iteration} to {args.save} ("
                    + ("imported from Hugging Face, weights only, " if imported else
                       "the averaged weights x, " if args.export_sf_x else "resharded, ")
                    + f"{time.perf_counter() - t0:.1f}s)")
        hooks.finish()  # the model left behind holds the final weights on every rank
        train_s = time.perf_counter() - t_train
        train_hist = history["train"]
        summary = {
            "event": SUMMARY_EVENT, "optimizer": args.optimizer, "iterations": iteration,
            "final_train_loss": train_hist[max(train_hist)] if train_hist else None,
            "final_val_loss": history["valid"][max(history["valid"])] if history["valid"] else None,
            "skipped_steps": skipped, "md_skipped_nonfinite": skipped_steps(optimizer),
            "train_loss_history": {str(k): v for k, v in sorted(train_hist.items())},
            "val_loss_history": {str(k): v for k, v in sorted(history["valid"].items())},
            "tokens_per_s": it_done * tokens_per_iter / train_s if it_done else None,
            "train_s": round(train_s, 2), "wall_s": round(time.perf_counter() - t_start, 2),
            "world_size": args.world_size, "tp": args.tensor_model_parallel_size,
            "pp": args.pipeline_model_parallel_size,
            "ep": args.expert_model_parallel_size, "dp": args.data_parallel_size,
            "last_checkpoint": last_saved, "last_eval": last_eval, "grad_buckets": buckets,
        }
        _print0(json.dumps(summary))
        runlog.write(summary)
        return summary
    finally:
        if writer is not None:
            writer.close()
        if runlog is not None:
            runlog.close()
        if config is not None:  # the config's hooks would keep the optimizer and model alive (see _release)
            _release(config)
        shutdown(created)


def main(argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None, prog: Optional[str] = None) -> int:
    """Command-line entry: usage errors exit 2 before anything is built; errors after start-up
    (:class:`~megatron_md.errors.RunError`: a bad checkpoint, a diverged loss) print one
    line from rank 0 and exit 1."""
    parser = build_parser(defaults, prog=prog)
    try:
        args = validate_args(parse_with_recipe(parser, argv))
    except ArgumentError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{parser.prog}: error: {exc}\n(all flags: {parser.prog} --help)", file=sys.stderr, flush=True)
        return 2
    try:
        pretrain(args)
    except RunError as exc:  # raised on every rank alike; one clean line, no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
