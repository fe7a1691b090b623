"""One rank of the multi-process ALaST test (``tests/test_ddp.py`` runs it under torchrun, gloo on the CPU).

Every rank trains the same tiny ViT, wrapped in ``DistributedDataParallel(find_unused_parameters=True)``
(or, with ``--fsdp``, sharded by FSDP2's ``fully_shard``), on batches of its own for ``--steps`` steps,
and writes what it saw to ``OUT/rank<r>.pt``: each step's plan,
whether every block frozen in a step kept its parameters bit for bit, and the final parameters.

``--seed-per-rank`` gives each rank another controller seed (the controller must still agree on rank 0's);
``--no-agreement`` gives each rank a process group of its own, so the ranks plan independently — the
harness's own check that diverging plans are detected.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import alast_kernels as ak
from alast_kernels.vit import embedding_parameters

L = 4


def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=L, num_heads=3, num_classes=5)


def make_optimizer(params, sgd: bool):
    if sgd:
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)


def local_batches(rank: int, steps: int, batch: int):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(steps)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--policy", default="alast")
    p.add_argument("--sample", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed-per-rank", action="store_true")
    p.add_argument("--no-agreement", action="store_true")
    p.add_argument("--sgd", action="store_true", help="SGD with momentum instead of AdamW")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block, then the model)")
    p.add_argument("--freeze-embeddings", action="store_true", help="train_embeddings=False (they train by default)")
    p.add_argument("--tokens", default=None, help="carry or drop (default: the policy's)")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = tiny_vit()
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        ak.convert(model)  # before sharding: FSDP2 makes its own subclass of each block's class
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)
        ddp = fully_shard(model, mesh=mesh)
    else:
        ddp = DDP(model, find_unused_parameters=True)
    options = {"policy": args.policy, "sample": args.sample, "train_layers": 2, "alpha": 0.5,
               "seed": rank if args.seed_per_rank else 0, "tokens": args.tokens}
    if args.policy == "alast":
        options["token_budget"] = 0.5
    if args.freeze_embeddings:
        options["train_embeddings"] = False
    if args.policy == "fixed":
        options = {"policy": "fixed", "keep_ratios": [1.0] * L, "train": [True] * L, "train_embeddings": True}
    if args.no_agreement:
        own = [dist.new_group([r]) for r in range(world)][rank]
        options["process_group"] = own
    ctrl = ak.ALaST(ddp, **options)
    opt = make_optimizer(ddp.parameters(), args.sgd)

    plans, frozen_unchanged = [], []
    for x, y in local_batches(rank, args.steps, args.batch):
        with ctrl.step() as plan:
            frozen = [p for blk, t in zip(model.blocks, plan.train) if not t for p in blk.parameters()]
            if not ctrl.train_embeddings:
                frozen += list(embedding_parameters(model))
            before = [p.detach().clone() for p in frozen]
            F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        plans.append((plan.keep_ratios, plan.train, ctrl.history[-1]["keep"]))
        frozen_unchanged.append(all(torch.equal(p, b) for p, b in zip(frozen, before)))
    full = (lambda p: p.full_tensor()) if args.fsdp else (lambda p: p)
    torch.save({"plans": plans, "frozen_unchanged": frozen_unchanged, "budgets": ctrl.budgets,
                "params": {n: full(p).detach().clone() for n, p in model.named_parameters()}},
               os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
