"""ALaST under ``torch.compile`` (inductor on the CPU): training equals eager, compilations stay bounded.

While a step is on, a converted model's blocks run one by one, so each block's code is compiled once per
kind of plan (trained or frozen, with or without an input gradient) and every block shares those graphs;
keep counts reach the blocks as dynamic sizes. These tests count the compiled graphs of
``ViTBlock.forward`` and check a block compiles with ``fullgraph=True`` in a fresh process.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import alast_kernels as ak
from alast_kernels import ViTBlock

pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("reference_backend")]

L = 3
STEPS = 30


def tiny():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=L, num_heads=3, num_classes=5)


def batches(count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g))
            for _ in range(count)]


def block_compilations() -> int:
    return len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(ViTBlock.forward.__code__))


def train(model, ctrl, data, forward):
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    losses, keeps, trains = [], [], []
    for x, y in data:
        with ctrl.step() as plan:
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        keeps.append(ctrl.history[-1]["keep"])
        trains.append(plan.train)
    return losses, keeps, trains


@pytest.mark.parametrize("policy,options", [
    ("alast", dict(token_budget=0.5, alpha=0.5, min_keep=0.2, tokens="carry")),
    ("alast", dict(token_budget=0.6, alpha=0.5, min_keep=0.2, tokens="drop", sample=True)),
    ("paper", dict(alpha=0.5))], ids=["alast-carry", "alast-drop", "paper"])
def test_compiled_model_trains_like_eager_with_bounded_compilations(policy, options):
    torch._dynamo.reset()
    eager_model = tiny()
    model = copy.deepcopy(eager_model)
    options = dict(options, policy=policy, train_layers=2)
    eager_ctrl, ctrl = ak.ALaST(eager_model, **options), ak.ALaST(model, **options)
    compiled = torch.compile(model)
    data = batches(STEPS)
    want, want_keeps, want_trains = train(eager_model, eager_ctrl, data, eager_model)
    got, keeps, trains = train(model, ctrl, data, compiled)

    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert keeps == want_keeps and trains == want_trains
    # The plans did vary (else the bound below would be trivial) ...
    assert len({tuple(k) for k in keeps}) + len({tuple(t) for t in trains}) >= 4
    # ... and each block was compiled at most 3 times (the blocks share their compiled graphs).
    compilations = block_compilations()
    print(f"{policy}: ViTBlock.forward compiled {compilations} times for {L} blocks over {STEPS} steps")
    assert 1 <= compilations <= 3 * L, compilations
    # Eval runs every token and every layer, compiled as usual.
    model.eval(), eager_model.eval()
    x = data[0][0]
    with torch.no_grad():
        assert (compiled(x) - eager_model(x)).abs().max().item() <= 1e-4


COLD_START = textwrap.dedent("""
    import torch, alast_kernels as ak
    from alast_kernels import BlockPlan
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = ak.convert(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3))
    block = model.blocks[0].train()
    x = torch.randn(2, 17, 48)
    compiled = torch.compile(block, fullgraph=True)   # before any op has run eagerly
    for plan in (None, BlockPlan(0.5, train=True, num_patches=16), BlockPlan(0.25, train=False, num_patches=16)):
        block.alast_plan = plan
        got = compiled(x)
        want = torch.compiler.disable(block)(x)
        assert (got - want).abs().max().item() <= 1e-5, plan
    print("ok")
""")


def test_a_block_compiles_with_fullgraph_from_a_cold_start():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", COLD_START], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
