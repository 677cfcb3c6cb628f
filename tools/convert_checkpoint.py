#!/usr/bin/env python3
"""Convert driver checkpoints (``--save`` directories of examples/pretrain_gpt.py / pretrain_moe.py).

Subcommands:

  sf-to-x Schedule-free run (--optimizer sf-adamw|sf-normuon) → a checkpoint of the same layout
          and format whose model is the averaged iterate x (what the driver evaluates), without
          optimizer state: load it with --no-load-optim, or export it with to-hf. From torch_dist
          it is a driver run at the checkpoint's own layout (--export-sf-x; each rank its shard).

  to-md   Plain or AdamW-trained checkpoint -> one that MD (--optimizer muon-md|adam-md) resumes with
          the model unchanged: the same weights (same layout, no optimizer state), resumed with
          --no-load-optim --md-init factor --no-md-embedding-unit-norm. MD then keeps every hidden
          matrix and the untied head as they are and factors its gains from their row norms
          (directions on their spheres, W = diag(s_r) D diag(s_c)): the logits do not change. MD's
          unit-norm embedding rule cannot keep a trained embedding, so the embedding (and a tied
          head) continue on the Adam partner. A run that loads the result without these flags
          stops before training, naming them. Either format (torch_dist: the same files, hard-linked).

  reshard The checkpoint at another TP/PP/EP/DP layout and/or format, optimizer state included:
          runs the driver (torchrun, --nproc-per-node N) with the checkpoint's own model and
          optimizer flags (from its manifest) plus the target layout flags, loading it and
          re-saving it with nothing left to train. From a torch_dist checkpoint every optimizer
          state is resharded; from a per-rank (torch) one, the weights only (--no-load-optim).
          --ckpt-format torch writes per-rank files, which sf-to-x reads.

  from-hf A Hugging Face LlamaForCausalLM / MixtralForCausalLM / Qwen3ForCausalLM folder (save_pretrained:
          model.safetensors or shards with an index; fp32 or bf16) -> a checkpoint of its weights
          (iteration 0, no optimizer state), written by the driver itself (--train-iters 0 --load-hf)
          on --nproc ranks at --layout, each rank reading only its own part of each tensor. The
          model flags its config.json implies are printed, written to <save>/from_hf.json and
          recorded in the manifest (a run with other flags is refused, naming them). Continue
          training with those flags and --load <save> --no-load-optim (any optimizer; MD also
          --md-init factor --no-md-embedding-unit-norm: the weights are kept, the gains factored
          from them). Or skip the checkpoint: the driver's --load-hf DIR trains from the folder.
          Anything that no driver flag computes (RoPE scaling, biases, sliding windows, another
          activation or architecture) is refused, naming it.

  to-hf   Hugging Face safetensors + config.json + generation_config.json: LlamaForCausalLM for
          dense models, MixtralForCausalLM for MoE. Works offline on any TP/PP/EP/DP layout, from
          torch_dist (read one layer's tensor at a time: memory bounded by the largest tensor, not
          the model) or per-rank files (merged), every file verified against the manifest first.
          --dtype bf16|fp32; --max-shard-size (e.g. 5GB) writes shards plus
          model.safetensors.index.json, as the Hub does; --tokenizer-model adds the tokenizer
          (AutoTokenizer encodes text to our preprocessing's ids). QK-norm (--qk-layernorm) dense
          models export as Qwen3. The model must be Llama-style:
          --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear
          (GQA via --num-query-groups and an untied head are optional).

Examples:

  # train a Llama-style model, then export it
  torchrun --nproc-per-node 2 examples/pretrain_gpt.py --tensor-model-parallel-size 2 \\
      --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \\
      --num-layers 4 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2 ... --save ckpt/
  python tools/convert_checkpoint.py to-hf --load ckpt/ --out hf_model/
  python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('hf_model')"

  # schedule-free: export the averaged weights x
  python tools/convert_checkpoint.py sf-to-x --load sf_ckpt/ --save sf_x/
  python tools/convert_checkpoint.py to-hf --load sf_x/ --out hf_model/

  # AdamW-trained -> MuonMD, outputs unchanged (same layout and model flags as the AdamW run)
  torchrun --nproc-per-node 2 examples/pretrain_gpt.py --tensor-model-parallel-size 2 ... \\
      --optimizer adam --save adam_ckpt/
  python tools/convert_checkpoint.py to-md --load adam_ckpt/ --save md_ckpt/
  torchrun --nproc-per-node 2 examples/pretrain_gpt.py --tensor-model-parallel-size 2 ... \\
      --weight-decay 0 --load md_ckpt/ --optimizer muon-md \\
      --no-load-optim --md-init factor --no-md-embedding-unit-norm --save md_run/
  # schedule-free runs: sf-to-x first, then to-md of its output

  # a Hugging Face Llama -> torch_dist (written at TP=2), then continue pretraining it with MuonMD
  python tools/convert_checkpoint.py from-hf --load-hf Llama-3.2-1B/ --save llama_ckpt/ --nproc 2 \
      --layout "--tensor-model-parallel-size 2"
  torchrun --nproc-per-node 8 examples/pretrain_gpt.py $(python tools/convert_checkpoint.py from-hf \
      --load-hf Llama-3.2-1B/ --print-flags) --tensor-model-parallel-size 2 --load llama_ckpt/ \
      --no-load-optim --optimizer muon-md --md-init factor --no-md-embedding-unit-norm --weight-decay 0 ...

  # bf16, in shards of at most 2 GB with an index, as the Hub expects
  python tools/convert_checkpoint.py to-hf --load ckpt/ --out hf_model/ --dtype bf16 --max-shard-size 2GB

  # a TP=2 torch_dist checkpoint -> PP=2 (2 ranks), and -> one rank's per-rank files
  python tools/convert_checkpoint.py reshard --load ckpt/ --save ckpt_pp2/ --nproc 2 \
      --layout "--pipeline-model-parallel-size 2"
  python tools/convert_checkpoint.py reshard --load ckpt/ --save ckpt_torch/ --nproc 1 --ckpt-format torch

  # a specific iteration instead of the latest
  python tools/convert_checkpoint.py to-hf --load ckpt/ --ckpt-step 1000 --out hf_model/

Errors (a damaged or incomplete checkpoint, a model Hugging Face cannot represent exactly, to-md
of a checkpoint that already is MD, an output directory that already holds a checkpoint) are
printed as one line naming the file or the flags; exit code 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow running without an editable install
    sys.path.insert(0, str(REPO))


def _to_hf(a) -> None:
    from megatron_md.checkpoint.hf import parse_size, write_hf
    from megatron_md.checkpoint.reader import open_model
    shard = parse_size(a.max_shard_size) if a.max_shard_size else None
    model = open_model(a.load, a.ckpt_step)
    config = write_hf(model, model.topology, a.out, dtype=a.dtype, max_shard_size=shard,
                      tokenizer_model=a.tokenizer_model)
    print(f"wrote {config['architectures'][0]} ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"vocab {config['vocab_size']}, {a.dtype}) of iteration {model.iteration} to {a.out}")


def _from_hf(a) -> None:
    import shlex

    from megatron_md.checkpoint.hf_import import from_hf, model_flags, read_config
    if a.print_flags:
        flags = model_flags(read_config(a.load_hf), megatron_lm=a.megatron_lm) + [
            "--make-vocab-size-divisible-by", str(a.make_vocab_size_divisible_by)]
        print(shlex.join(flags))
        return
    if not a.save:
        raise ValueError("--save is required (or --print-flags)")
    r = from_hf(a.load_hf, a.save, nproc=a.nproc, layout=shlex.split(a.layout), ckpt_format=a.ckpt_format,
                divisible_by=a.make_vocab_size_divisible_by, extra=shlex.split(a.driver_args), dry_run=a.dry_run)
    if a.dry_run:
        print(shlex.join(r["command"]))
        return
    print(f"wrote the {r['architecture']} weights of {a.load_hf} to {a.save} (iteration 0, {a.ckpt_format}); "
          f"train it with\n  {shlex.join(r['model_flags'])} --load {a.save} --no-load-optim\n"
          f"  (MD: also --md-init factor --no-md-embedding-unit-norm)")


def _sf_to_x(a) -> None:
    from megatron_md.checkpoint.sf import sf_to_x
    it = sf_to_x(a.load, a.save, a.ckpt_step)
    print(f"wrote the averaged (x) weights of iteration {it} to {a.save} (load with --no-load-optim)")


def _to_md(a) -> None:
    from megatron_md.checkpoint.md import to_md
    r = to_md(a.load, a.save, a.ckpt_step)
    lay = r["layout"]
    print(f"wrote the weights of iteration {r['iteration']} (trained with --optimizer {r['from']}) to {a.save}, MD-ready; "
          f"resume with the model flags and layout of that run (world size {lay['world_size']}: TP {lay['tp']}, "
          f"PP {lay['pp']}, EP {lay['ep']}, DP {lay['dp']}) and\n"
          f"  --load {a.save} --optimizer muon-md (or adam-md) --weight-decay 0 {' '.join(r['resume_flags'])}")


def _reshard(a) -> None:
    import shlex

    from megatron_md.checkpoint.reshard import reshard
    cmd = reshard(a.load, a.save, nproc=a.nproc, layout=shlex.split(a.layout), ckpt_format=a.ckpt_format,
                  iteration=a.ckpt_step, extra=shlex.split(a.driver_args), dry_run=a.dry_run)
    if a.dry_run:
        print(shlex.join(cmd))
        return
    print(f"wrote {a.load} at {a.nproc} rank(s) {a.layout or '(TP=PP=EP=1)'} as {a.ckpt_format} into {a.save}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{sf-to-x,to-md,reshard,to-hf,from-hf}")
    s = sub.add_parser("sf-to-x", help="schedule-free checkpoint -> model checkpoint at the averaged x",
                       description="schedule-free checkpoint -> model checkpoint at the averaged x")
    s.add_argument("--load", required=True, help="checkpoint directory of a schedule-free run")
    s.add_argument("--ckpt-step", type=int, default=None, help="iteration (default: the latest)")
    s.add_argument("--save", required=True, help="new output checkpoint directory")
    s.set_defaults(func=_sf_to_x)
    m = sub.add_parser("to-md", help="plain/AdamW checkpoint -> MD-ready checkpoint (outputs unchanged)",
                       description="plain/AdamW checkpoint -> MD-ready checkpoint: the same weights, resumed with "
                                   "--no-load-optim --md-init factor --no-md-embedding-unit-norm "
                                   "(MD factors its gains from them; the model's outputs do not change)",
                       epilog="example: python tools/convert_checkpoint.py to-md --load adam_ckpt/ --save md_ckpt/ "
                              "(then: examples/pretrain_gpt.py <the run's model and layout flags> --load md_ckpt/ "
                              "--optimizer muon-md --weight-decay 0 --no-load-optim --md-init factor "
                              "--no-md-embedding-unit-norm)")
    m.add_argument("--load", required=True, help="checkpoint directory of a non-MD, non-schedule-free run")
    m.add_argument("--ckpt-step", type=int, default=None, help="iteration (default: the latest)")
    m.add_argument("--save", required=True, help="new output checkpoint directory")
    m.set_defaults(func=_to_md)
    r = sub.add_parser("reshard", help="the checkpoint at another TP/PP/EP/DP layout or format (optimizer state included)",
                       description="the checkpoint at another TP/PP/EP/DP layout or --ckpt-format, optimizer state "
                                   "included (from torch_dist): a driver run with nothing left to train")
    r.add_argument("--load", required=True, help="checkpoint directory")
    r.add_argument("--ckpt-step", type=int, default=None, help="iteration (default: the latest)")
    r.add_argument("--save", required=True, help="new output checkpoint directory")
    r.add_argument("--nproc", type=int, default=1, help="ranks of the target layout (torchrun --nproc-per-node)")
    r.add_argument("--layout", default="", help='target layout flags, e.g. "--tensor-model-parallel-size 2 '
                                                '--use-distributed-optimizer" (default: TP=PP=EP=1, all DP)')
    r.add_argument("--ckpt-format", choices=["torch_dist", "torch"], default="torch_dist")
    r.add_argument("--driver-args", default="", help="more driver flags, e.g. MD options the run used "
                                                      '("--no-md-head-gains")')
    r.add_argument("--dry-run", action="store_true", help="print the driver command instead of running it")
    r.set_defaults(func=_reshard)
    h = sub.add_parser("to-hf", help="Hugging Face Llama/Mixtral safetensors + config.json",
                       description="Hugging Face Llama (dense) / Mixtral (MoE) safetensors + config.json")
    h.add_argument("--load", required=True, help="checkpoint directory (the driver's --save)")
    h.add_argument("--ckpt-step", type=int, default=None, help="iteration (default: the latest)")
    h.add_argument("--out", required=True, help="output directory")
    h.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the exported weights")
    h.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="largest safetensors file, e.g. 5GB or 500MB: shards plus model.safetensors.index.json "
                        "(default: one model.safetensors)")
    h.add_argument("--tokenizer-model", default=None, metavar="FILE",
                   help="the run's sentencepiece model (tools/preprocess_data.py's <prefix>.json names it): also "
                        "write tokenizer.json + tokenizer_config.json, loadable by transformers.AutoTokenizer and "
                        "encoding text to the ids of our preprocessing")
    h.set_defaults(func=_to_hf)
    f = sub.add_parser("from-hf", help="Hugging Face Llama/Mixtral/Qwen3 folder -> checkpoint (weights only)",
                       description="Hugging Face Llama / Mixtral / Qwen3 folder -> a checkpoint of its weights "
                                   "(iteration 0), written by the driver at the given layout")
    f.add_argument("--load-hf", required=True, metavar="DIR", help="the Hugging Face model folder (config.json + "
                                                                    "safetensors)")
    f.add_argument("--save", default=None, help="new output checkpoint directory")
    f.add_argument("--print-flags", action="store_true", help="print the driver's model flags of the folder's "
                                                             "config.json and stop")
    f.add_argument("--megatron-lm", action="store_true", help="with --print-flags: Megatron-LM's pretrain_gpt.py "
                   "spelling (with our plugin, train straight from the folder there: --load-hf DIR)")
    f.add_argument("--nproc", type=int, default=1, help="ranks of the writing run (torchrun --nproc-per-node)")
    f.add_argument("--layout", default="", help='layout flags of the writing run, e.g. "--tensor-model-parallel-size 2"')
    f.add_argument("--ckpt-format", choices=["torch_dist", "torch"], default="torch_dist")
    f.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Megatron's vocabulary padding (times TP); runs that load the checkpoint pass the same")
    f.add_argument("--driver-args", default="", help='more driver flags, e.g. "--transformer-impl transformer_engine"')
    f.add_argument("--dry-run", action="store_true", help="print the driver command instead of running it")
    f.set_defaults(func=_from_hf)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from megatron_md.errors import RunError
    try:
        a.func(a)
    except (RunError, ValueError, KeyError) as exc:
        print(f"convert_checkpoint.py {a.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
