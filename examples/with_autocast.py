# Mixed precision: the branches run in bfloat16, the residual stream and the token scores stay float32.
import timm, torch, torch.nn.functional as F
import alast_kernels as ak

model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, depth=4, num_classes=10)
alast = ak.ALaST(model, token_budget=0.5)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(3):
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    with alast.step(), torch.autocast("cpu", dtype=torch.bfloat16):   # "cuda" on a GPU
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
print("loss", round(loss.item(), 3))
