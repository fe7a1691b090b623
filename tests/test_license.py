"""The Apache-2.0 licence the metadata names is in the repository, the sdist and the wheel."""
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_is_the_apache_2_0_text_the_metadata_names():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


def _source_copy(dest: Path) -> None:
    """What a fresh clone builds from — without this checkout's build outputs (a build writes
    ``alast_kernels/_build_info.py``, which must not overwrite the one next to the compiled extension)."""
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "LICENSE", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py")
    shutil.copytree(ROOT / "alast_kernels", dest / "alast_kernels", ignore=skip)
    shutil.copytree(ROOT / "python", dest / "python", ignore=skip)  # the job, packaged beside the library
    shutil.copytree(ROOT / "csrc", dest / "csrc", ignore=skip)


def test_sdist_and_wheel_carry_the_license(tmp_path):
    pytest.importorskip("build")
    src = tmp_path / "src"
    src.mkdir()
    _source_copy(src)
    out = tmp_path / "dist"
    env = {**os.environ, "ALAST_SKIP_CUDA": "1"}  # the pure-Python build: the licence does not depend on it
    env.pop("ALAST_FORCE_CUDA", None)
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "-o", str(out), str(src)],
                   check=True, capture_output=True, env=env)
    expected = (ROOT / "LICENSE").read_bytes()
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [m for m in tar.getnames() if m.endswith("/LICENSE")]
        assert len(names) == 1 and names[0].count("/") == 1, names  # at the top of the sdist
        assert tar.extractfile(names[0]).read() == expected
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        (licence,) = [n for n in whl.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert whl.read(licence) == expected
        (metadata,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        lines = whl.read(metadata).decode().splitlines()
    assert "License-Expression: Apache-2.0" in lines and "License-File: LICENSE" in lines
