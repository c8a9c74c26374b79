"""torchrun worker for tests/test_layerwise_dist.py: --layerwise's non-finite policies with the fault on one rank.

``python -m torch.distributed.run --nproc-per-node 2 tests/layerwise_dist_worker.py STRATEGY POLICY DIR`` trains a small
MLP for 4 steps under DDP or FSDP2 through leantrain's layerwise closure. Step 2: rank 0's local gradient of
``2.weight`` gets a NaN at element 0 while its loss stays finite (under FSDP2 only rank 0's shard is hit); step 3:
rank 1's loss is NaN. Every rank writes ``DIR/rank-N.json``; nothing may hang.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from leantrain.config import TrainConfig
from leantrain.dist import DistContext, full_tensor
from leantrain.layerwise import LayerwiseStep
from leantrain.loop import Closure

NAN_GRAD_STEP, NAN_LOSS_STEP = 1, 2  # 0-based


class NanGradAtZero(torch.autograd.Function):
    """Forward: a zero scalar (the loss stays finite); backward: NaN at element 0 of the input's gradient."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        out = grad.new_zeros(ctx.shape)
        out.view(-1)[0] = float("nan")
        return out


class Task:
    """The closure's view of a task: a model (and its wrapper), global batches and a loss."""

    def __init__(self, model: nn.Module, forward_model: nn.Module, rank: int):
        self.model, self.forward_model, self.rank, self.step = model, forward_model, rank, 0

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        self.step = index
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(index))
        if index == NAN_LOSS_STEP:
            x[8:] = float("nan")  # rank 1's half of the global batch
        return {"x": x}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_model(batch["x"]).square().mean()


def main() -> None:
    strategy, policy, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        forward_model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    else:
        from torch.distributed.fsdp import fully_shard

        for i in (0, 2, 4):
            fully_shard(model[i])
        forward_model = fully_shard(model)
    task = Task(model, forward_model, rank)

    def inject(module: nn.Module, args: tuple) -> tuple:  # after FSDP2's unshard: module.weight is the full one
        if rank == 0 and task.step == NAN_GRAD_STEP and torch.is_grad_enabled():
            return (args[0] + NanGradAtZero.apply(module.weight),)
        return args

    model[2].register_forward_pre_hook(inject)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hooks = LayerwiseStep(optimizer, model, nan_policy=policy, strategy=strategy, world=world)
    hooks.register(ddp=forward_model if strategy == "ddp" else None)
    cfg = TrainConfig(layerwise=True, nan_policy=policy, grad_clip=None)
    closure = Closure(task, optimizer, cfg, DistContext(rank, world, 0, torch.device("cpu"), strategy),
                      layerwise=hooks)
    result: dict = {"rank": rank, "losses": [], "error": None}
    weight = lambda: full_tensor(model[2].weight.detach()).clone()  # noqa: E731  (a collective under FSDP2)
    try:
        for step in range(4):
            closure.step = step
            before = weight()
            result["losses"].append(float(closure()))
            result[f"2.weight_changed_{step}"] = not torch.equal(before, weight())
    except FloatingPointError as exc:
        result["error"] = str(exc)
    result["skipped_updates"] = hooks.skipped_updates
    full = torch.cat([full_tensor(p.detach()).reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(full) for _ in range(world)]
    dist.all_gather(gathered, full)  # every rank still answers: nothing hangs, and the replicas agree
    result["ranks_agree"] = all(torch.equal(gathered[0], g) for g in gathered)
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
