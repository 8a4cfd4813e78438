"""The kernels folder is importable only as rrhf_fast.kernels, never as a bare `kernels`.

transformers probes for the Hugging Face `kernels` package under that bare name; if our folder were
found instead, its checks (and model building) could break.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_installed_environment_has_no_bare_kernels_package(tmp_path):
    out = run_python(
        "import importlib.util, rrhf_fast.kernels as k; "
        "print(importlib.util.find_spec('kernels') is None, k.__file__)",
        cwd=tmp_path,
    )
    absent, path = out.split()
    assert absent == "True"
    assert Path(path) == ROOT / "kernels" / "__init__.py"


def test_transformers_models_build_from_the_repository_root():
    # `python -c` from the root puts the root on sys.path: `kernels` is then found as our folder.
    code = (
        "import torch, transformers\n"
        "from transformers.utils import import_utils\n"
        "from rrhf_fast.models.tiny import build_tiny_model\n"
        "model = build_tiny_model('llama')\n"
        "logits = model(torch.tensor([[1, 2, 3]])).logits\n"
        "import kernels\n"
        "print(import_utils.is_kernels_available(), tuple(logits.shape), kernels.__all__)\n"
    )
    out = run_python(code, cwd=ROOT)
    assert out == "False (1, 3, 259) []"
