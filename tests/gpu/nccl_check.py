"""torchrun --nproc-per-node 2 tests/gpu/nccl_check.py — sharded optimizers on NCCL vs reference."""
import os

import torch
import torch.distributed as dist

from megatron_md import optim
from megatron_md.optim import reference as ref
from megatron_md.shard import FlatRange, TensorParallel, Whole


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    group = dist.new_group(list(range(world)))
    shape = (256, 192)
    for name in ("Muon", "NorMuon", "RMNP", "AdamH", "MuonMD", "AdamMD", "SFNorMuon"):
        for layout in ("tp0", "tp1", "flat"):
            torch.manual_seed(0)
            w0 = torch.randn(shape) * 0.1
            if layout == "flat":
                n = w0.numel()
                cut = n // 2 + 37
                s, e = (0, cut) if rank == 0 else (cut, n)
                lay = FlatRange(s, e, group, Whole(shape))
                local = lambda t: t.reshape(-1)[s:e]  # noqa: E731
            else:
                dim = int(layout[-1])
                lay = TensorParallel(shape, dim, group)
                local = lambda t: lay.take_local(t)  # noqa: E731
            p = torch.nn.Parameter(local(w0).clone().cuda())
            kw = dict(ns_dtype=torch.float32) if name in ("Muon", "NorMuon", "MuonMD", "SFNorMuon") else {}
            opt = getattr(optim, name)([p], shards={p: lay}, **kw)
            oracle = getattr(ref, name)([w0.clone()])
            for t in range(5):
                g = torch.randn(shape, generator=torch.Generator().manual_seed(100 + t))
                p.grad = local(g).clone().cuda()
                opt.step()
                oracle.step([g])
            torch.testing.assert_close(p.detach().cpu(), local(oracle.params[0]), rtol=1e-4, atol=1e-5)
    dist.barrier()
    if rank == 0:
        print("NCCL CHECKS PASSED")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
