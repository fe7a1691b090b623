# ALaST over peft LoRA: the adapters of the blocks planned to train (and the head) learn.
import timm, torch, torch.nn.functional as F
from peft import LoraConfig, get_peft_model
import alast_kernels as ak

model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, depth=4, num_classes=10)
lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
                  modules_to_save=["head"])
model = get_peft_model(model, lora)           # peft first, or ak.convert first: both orders work
alast = ak.ALaST(model, token_budget=0.5)     # finds the timm ViT inside the PeftModel
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for _ in range(3):
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    with alast.step():
        F.cross_entropy(model(x), y).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
print("trained blocks:", [i for i, t in enumerate(alast.history[-1]["train"]) if t])
