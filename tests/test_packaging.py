"""A bare `import kernels` is always Hugging Face's package; ours is only ever `rrhf_fast.kernels`.

transformers >= 5.25 depends on Hugging Face's `kernels` package and imports it by that bare name
(`transformers.integrations.hub_kernels`). Our kernels live inside the package (rrhf_fast/kernels/),
so no working directory, the repository root included, can put a folder of ours under that name.
Each check runs in a fresh interpreter from the repository root, where `python -c`, `python -m` and
torchrun put the root first on sys.path, and from elsewhere.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rrhf_fast.data.records import Example, write_examples
from rrhf_fast.models.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout.strip()


def test_nothing_of_ours_is_named_kernels_at_the_root():
    assert not (ROOT / "kernels").exists() and not (ROOT / "kernels.py").exists()
    text = (ROOT / "pyproject.toml").read_text()
    packages = re.findall(r'^    "([\w.]+)",$', text.split("packages = [", 1)[1].split("]", 1)[0], re.M)
    assert packages and all(p == "rrhf_fast" or p.startswith("rrhf_fast.") for p in packages), packages
    assert "package-dir" not in text


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_bare_kernels_is_hugging_faces_package(where, tmp_path):
    code = (
        "import json, kernels, rrhf_fast.kernels as ours\n"
        "import transformers.integrations.hub_kernels\n"
        "from kernels import CUDAProperties\n"
        "print(json.dumps([kernels.__file__, ours.__file__]))\n"
    )
    theirs, ours = json.loads(run([sys.executable, "-c", code], cwd=ROOT if where == "root" else tmp_path))
    dist = importlib.metadata.distribution("kernels")
    assert Path(theirs).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()
    assert Path(ours).resolve() == ROOT / "rrhf_fast" / "kernels" / "__init__.py"


def test_transformers_models_build_from_the_repository_root():
    code = (
        "import torch\n"
        "from rrhf_fast.models.tiny import build_tiny_model\n"
        "print(tuple(build_tiny_model('llama')(torch.tensor([[1, 2, 3]])).logits.shape))\n"
    )
    assert run([sys.executable, "-c", code], cwd=ROOT) == "(1, 3, 259)"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("root_cli")
    examples = [Example(f"sort {d}:", ["".join(sorted(d)), d], [1.0, 0.0]) for d in ("312", "9750", "48")]
    write_examples(root / "d.jsonl", examples)
    return save_tiny_model(root / "model", seed=0), root / "d.jsonl", root


def train_argv(model, data, out) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--optim", "adamw", "--max-steps", "1", "--micro-batch-tokens", "64", "--device", "cpu",
            "--log-every", "0", "--no-plot"]  # fmt: skip


def test_python_m_cli_trains_from_the_repository_root(tiny_run):
    model, data, root = tiny_run
    run([sys.executable, "-m", "rrhf_fast.cli", *train_argv(model, data, root / "python_m")], cwd=ROOT)
    assert (root / "python_m" / "run.json").is_file()


def test_torchrun_two_processes_train_from_the_repository_root(tiny_run):
    model, data, root = tiny_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rrhf_fast.cli", *train_argv(model, data, root / "torchrun")]  # fmt: skip
    run(cmd, cwd=ROOT, timeout=600)
    assert json.loads((root / "torchrun" / "run.json").read_text())["world_size"] == 2


def test_the_install_page_names_the_locked_versions():
    """docs/install.md's tested versions are constraints.txt's pins, which `make install` installs."""
    lock = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    page = (ROOT / "docs" / "install.md").read_text()
    tested = page.split("Tested with ", 1)[1].split("New releases", 1)[0]
    tested = " ".join(tested.replace("`", "").split())
    for name in ("torch", "transformers", "triton", "bitsandbytes", "peft", "datasets", "kernels", "TRL"):
        assert f"{name} {lock[name.lower()]}" in tested, (name, lock[name.lower()], tested)
    make = (ROOT / "Makefile").read_text()
    assert "-c $(LOCK)" in make and "LOCK := constraints.txt" in make


def test_the_cli_keeps_optional_packages_chatter_off_stderr(tmp_path):
    """What the CLI does first (quiet_optional_imports), then the optional packages it may import:
    their import-time warnings (torchao's native libraries for other GPUs, torch's pytree
    registrations, bitsandbytes' hub-kernel fallback on CPUs with AVX512-BF16, as this machine's)
    never reach a user's stderr; `--help` prints nothing there either."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("from rrhf_fast.cli import quiet_optional_imports; quiet_optional_imports(); "
            "import transformers, torchao, bitsandbytes, peft")  # fmt: skip
    for command in (["-c", code], ["-m", "rrhf_fast.cli", "plan", "--help"]):
        done = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
