# torchrun --nproc-per-node 2 examples/with_ddp.py   (gloo on the CPU; nccl on GPUs)
import timm, torch, torch.distributed as dist, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import alast_kernels as ak

dist.init_process_group("gloo")
torch.manual_seed(0)                          # the same initial weights on every rank
model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, depth=4, num_classes=10)
ddp = DDP(model, find_unused_parameters=True)  # a frozen block's parameters get no gradient in a step
alast = ak.ALaST(ddp, token_budget=0.5, sample=True)   # every rank makes the same plan every step
opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(dist.get_rank())     # each rank its own data
for _ in range(3):
    x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
    with alast.step():
        F.cross_entropy(ddp(x), y).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
print(f"rank {dist.get_rank()}: plan {alast.history[-1]['keep']} {alast.history[-1]['train']}")
dist.destroy_process_group()
