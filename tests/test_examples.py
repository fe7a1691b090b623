"""The "Using it with" snippets of docs/usage.md: each is a file in examples/, shown verbatim there, and runs."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
EXPECTED = {
    "with_peft.py": r"trained blocks: \[[\d, ]+\]",
    "with_compile.py": r"kept tokens per block: \[[\d, ]+\]",
    "with_autocast.py": r"loss \d+\.\d+",
    "with_grad_accumulation.py": r"steps: 3",
    "with_checkpointing.py": r"kept tokens per block: \[[\d, ]+\]",
}


def _usage_blocks():
    with open(os.path.join(ROOT, "docs", "usage.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_in_the_usage_page_verbatim(name):
    with open(os.path.join(ROOT, "examples", name)) as f:
        code = f.read()
    assert code in _usage_blocks(), f"docs/usage.md does not show examples/{name} as it is"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(EXPECTED[name], done.stdout), done.stdout


@pytest.mark.distributed
def test_ddp_example_runs_under_torchrun_and_the_ranks_agree():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           os.path.join(ROOT, "examples", "with_ddp.py")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # The ranks' lines may interleave in one stream: match each plan by its own shape, not to the line end.
    plans = dict(re.findall(r"rank (\d): plan (\[[\d, ]+\] \[(?:True|False|, )+\])", done.stdout))
    assert set(plans) == {"0", "1"} and plans["0"] == plans["1"], done.stdout
