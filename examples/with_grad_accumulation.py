# Gradient accumulation: the micro-batches of one optimizer step share one alast.step() (one plan).
import timm, torch, torch.nn.functional as F
import alast_kernels as ak

model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, depth=4, num_classes=10)
alast = ak.ALaST(model, token_budget=0.5)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(3):
    with alast.step():
        for _ in range(4):                   # 4 micro-batches of 8 images
            x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
            (F.cross_entropy(model(x), y) / 4).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
print("steps:", len(alast.history))
