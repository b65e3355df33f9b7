"""Run by tests/test_train.py under ``torchrun --nproc_per_node 2``: one DDP backward of
the fused loss over a global batch split with the trainer's own ``shard``; rank 0 saves the
gradients for comparison with a single process on the whole batch."""

import sys

import torch
import torch.distributed as dist
from test_train import GLOBAL_BATCH, frozen_statistics_model, learnable_dataset, loss_on

from models.train.trainer import shard

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = frozen_statistics_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    index = shard(torch.arange(GLOBAL_BATCH), rank, world)
    loss_on(ddp, learnable_dataset(), index).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, sys.argv[1])
    # The wrapper holds the process group: gloo's worker threads must stop while the interpreter
    # is alive, after both ranks are done, or a rank can abort on exit.
    del ddp
    dist.barrier()
    dist.destroy_process_group()
