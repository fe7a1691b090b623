"""The contract every method of ``ak.methods`` keeps, checked over every registered method on a tiny ViT.

Trainable parameters are exactly those with ``requires_grad``; nothing else gets a gradient or changes under
optimizer steps; a step's state round-trips through ``state_dict`` (a resumed run continues exactly);
``step(update=False)`` advances nothing; eval is deterministic; a DDP-wrapped ``method.model`` trains.
"""
import copy
import re
import io

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from alast_kernels import methods

pytestmark = pytest.mark.usefixtures("reference_backend")

NAMES = methods.available()


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5,
                             **kwargs)


def batches(count, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(count)]


def make(name, seed=0, **kwargs):
    torch.manual_seed(100 + seed)  # methods that draw initial weights (LoRA, adapters) draw the same ones
    method = methods.create(name, tiny(seed, **kwargs))
    method.model.train()
    return method


def train(method, data, opt=None, forward=None):
    opt = opt or torch.optim.AdamW(method.trainable_parameters(), lr=1e-2, weight_decay=0.05)
    forward = forward or method.model
    losses = []
    for x, y in data:
        with method.step():
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt


def test_the_design_names_are_all_registered():
    for name in ("full", "linear", "lora", "alast", "alast+lora"):
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_only_trainable_parameters_get_gradients_and_change(name):
    method = make(name)
    trainable = {id(p) for p in method.trainable_parameters()}
    assert trainable and method.num_trainable() == sum(p.numel() for p in method.trainable_parameters())
    assert trainable == {id(p) for p in method.model.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    train(method, batches(3))
    changed = {n for n, p in method.model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in method.model.named_parameters() if id(p) not in trainable}
    assert changed and not (changed & frozen), sorted(changed & frozen)[:5]
    assert all(p.grad is None for n, p in method.model.named_parameters() if n in frozen)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_resumes_exactly(name):
    data = batches(4)
    whole = make(name)
    want, _ = train(whole, data)

    first = make(name)
    losses, opt = train(first, data[:2])
    buffer = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "opt": opt.state_dict(), "method": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = make(name, seed=7)  # other weights until loaded
    resumed.model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["method"])
    opt = torch.optim.AdamW(resumed.trainable_parameters(), lr=1e-2, weight_decay=0.05)
    opt.load_state_dict(saved["opt"])
    rest, _ = train(resumed, data[2:], opt)
    assert losses + rest == want
    for (n, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_a_step_without_update_advances_nothing(name):
    method = make(name)
    train(method, batches(2))
    state = copy.deepcopy(method.state_dict())
    x, y = batches(1, seed=5)[0]
    with method.step(update=False):
        F.cross_entropy(method.model(x), y).backward()
    method.model.zero_grad(set_to_none=True)
    assert _same(method.state_dict(), state)


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic_and_step_needs_training_mode(name):
    method = make(name)
    train(method, batches(1))
    method.model.eval()
    x = batches(1, seed=9)[0][0]
    with torch.no_grad():
        a, b = method.model(x), method.model(x)
    assert a.shape == (4, 5) and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="train"):
        with method.step():
            pass


@pytest.mark.parametrize("name", NAMES)
def test_register_tokens(name):
    method = make(name, reg_tokens=2)
    losses, _ = train(method, batches(2))
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_named(name):
    with pytest.raises(TypeError, match=rf"{re.escape(name)}: unknown option.*no_such_option"):
        methods.create(name, tiny(), no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_run_options_are_options_the_method_takes(name):
    """What a method asks of a run (``run_options``: EViT's schedule over half of the steps) are options it
    takes, and a method builds with them."""
    cls = methods.method_class(name)
    options = cls.run_options(10)
    assert set(options) <= set(methods.options_of(cls))
    methods.create(name, tiny(), **options)
    if name == "evit":
        assert options == {"schedule_steps": 5} and cls.run_options(1) == {"schedule_steps": 1}


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="magic"):
        methods.create("magic", tiny())
    with pytest.raises(ValueError, match="magic"):
        methods.method_class("magic")


@pytest.mark.parametrize("name", NAMES)
def test_ddp_wrapped_method_model_trains(name, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        method = make(name)
        plain = make(name)
        train(method, batches(2), forward=DDP(method.model, find_unused_parameters=True))
        train(plain, batches(2))
        for (n, p), (_, q) in zip(method.model.named_parameters(), plain.model.named_parameters()):
            assert torch.allclose(p, q, atol=1e-6), n
    finally:
        dist.destroy_process_group()


def test_methods_find_the_vit_inside_wrappers():
    model = tiny()
    wrapper = torch.nn.Sequential(model)
    method = methods.create("alast", wrapper)
    assert method.vit is model and method.model is wrapper
    with pytest.raises(TypeError, match="VisionTransformer"):
        methods.create("full", torch.nn.Linear(3, 4))


# ------------------------------------------------------------------------------ modes and refusals
def _mode_of_backbone(name):
    return methods.base._REGISTRY[name].backbone_training


@pytest.mark.parametrize("name", NAMES)
def test_step_checks_the_vits_own_mode(name):
    # method.model may be a new module around the ViT: `vit.eval()` on the model the user passed in (or
    # `vit.train()` on a frozen backbone kept in eval mode) does not show in method.model.training.
    vit = tiny()
    torch.manual_seed(100)
    method = methods.create(name, vit)
    method.model.train()
    trains = _mode_of_backbone(name)
    vit.train(not trains)
    wrong = "eval" if trains else "training"
    # (Where method.model is the ViT itself, the message says so of the model.)
    with pytest.raises(RuntimeError, match=rf"{re.escape(name)}: .*(the ViT is in {wrong} mode|needs the model in "
                                           rf"training mode)"):
        with method.step():
            pass
    method.model.train()
    vit.blocks[1].train(not trains)  # one block alone is enough, and is named
    with pytest.raises(RuntimeError, match=r"blocks\.1 is in"):
        with method.step():
            pass
    method.model.train()
    train(method, batches(1))  # back in the right modes, it trains


def _fingerprint(model):
    """Everything a method's creation could change, as comparable values."""
    modules = [(n, type(m), m.training, id(m), sorted(vars(m)), {k: len(v) for k, v in vars(m).items()
                                                                 if isinstance(v, dict)})
               for n, m in model.named_modules()]
    params = [(n, id(p), p.requires_grad) for n, p in model.named_parameters()]
    return modules, params


def _users_model():
    """A model as a user may hand it over: some parameters frozen, in training mode, with a hook."""
    model = tiny()
    model.cls_token.requires_grad_(False)
    model.blocks[0].requires_grad_(False)
    calls = []
    handle = model.blocks[2].register_forward_hook(lambda module, args, out: calls.append(1))
    return model, handle, calls


def _assert_unchanged(model, before, handle, calls):
    assert _fingerprint(model) == before[0]
    for (n, p), value in zip(model.state_dict().items(), before[1].values()):
        assert torch.equal(p, value), n
    model.eval()
    x = batches(1, seed=3)[0][0]
    with torch.no_grad():
        assert torch.equal(model(x), before[2](x))
    assert calls  # the user's hook still runs ...
    handle.remove()  # ... and its handle still removes it
    calls.clear()
    with torch.no_grad():
        model(x)
    assert not calls


# A bad option per method, each refused after the method began changing the model where it can be.
BAD_OPTIONS = {
    "lora": {"target_modules": ("no_such_layer",)},
    "alast": {"token_budget": 2},
    "alast+lora": {"token_budget": 2},
    "sparse_tuning": {"keep_rate": 2},
    "evit": {"keep_rate": 0},
    "losa": {"rank": 0},
    "synqt": {"rank": 0},
}


def _state_before(model):
    reference = copy.deepcopy(model).eval()
    return _fingerprint(model), {k: v.clone() for k, v in model.state_dict().items()}, reference


@pytest.mark.parametrize("name", [n for n in NAMES if n in BAD_OPTIONS])
def test_a_refused_option_leaves_the_model_as_it_was(name):
    model, handle, calls = _users_model()
    before = _state_before(model)
    with pytest.raises(ValueError):
        methods.create(name, model, **BAD_OPTIONS[name])
    _assert_unchanged(model, before, handle, calls)


@pytest.mark.parametrize("name", NAMES)
def test_a_creation_failing_after_all_its_changes_leaves_the_model_as_it_was(name, monkeypatch):
    # The strongest case: the method's constructor does everything it does, then fails.
    cls = methods.base._REGISTRY[name]
    build = cls.__init__

    def failing(self, model, **options):
        build(self, model, **options)
        raise RuntimeError("refused at the very end")

    monkeypatch.setattr(cls, "__init__", failing)
    model, handle, calls = _users_model()
    before = _state_before(model)
    with pytest.raises(RuntimeError, match="very end"):
        methods.create(name, model)
    _assert_unchanged(model, before, handle, calls)


def test_alast_takes_its_options_from_the_controller():
    """One signature: the ``alast`` method's options are ``ALaST.__init__``'s keywords, ``alast+lora`` adds the
    LoRA ones; nothing is repeated with its own defaults."""
    import inspect

    from alast_kernels.controller import ALaST
    controller = [n for n in inspect.signature(ALaST.__init__).parameters if n not in ("self", "model")]
    assert methods.options_of(type(methods.create("alast", tiny()))) == controller
    lora = methods.options_of(type(methods.create("alast+lora", tiny())))
    assert lora[:4] == ["rank", "lora_alpha", "dropout", "target_modules"] and lora[4:] == controller
