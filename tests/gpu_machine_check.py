"""What the GPU runs import and train, with the packages the GPU machine lacks made unimportable.

`python tests/gpu_machine_check.py OUT_DIR` (from the repository root; tests/test_gpu_runs.py runs
it): every test file the two GPU scripts name collects, every benchmark script they start imports,
and the trainer of tests/test_train_gpu.py trains two steps on the CPU. Prints the losses.
"""

import json
import re
import sys
from pathlib import Path

# Python packages rrhf-fast can use that the GPU machine does not have (its package list,
# /work/.library/device/KINDS.md, when this was written); only carried wheels can be installed there.
ABSENT = ("datasets", "bitsandbytes", "trl", "flash_attn", "liger_kernel", "cut_cross_entropy")
for name in ABSENT:
    sys.modules[name] = None  # `import name` raises ImportError

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path) -> None:
    scripts = "".join((ROOT / "benchmarks" / f"gpu_run{i}.sh").read_text() for i in (1, 2))
    files = sorted(set(re.findall(r"tests/test_\w+\.py", scripts)))
    assert pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files]) == 0
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
    for module in sorted(set(re.findall(r"benchmarks/(\w+)\.py", scripts))):
        __import__(module)

    import test_train_gpu

    from rrhf_fast.data.records import write_examples
    from rrhf_fast.models.tiny import build_tiny_model, build_tokenizer
    from rrhf_fast.training.train import train

    build_tiny_model("llama", seed=0).save_pretrained(out / "model")
    build_tokenizer().save_pretrained(out / "model")
    write_examples(out / "train.jsonl", test_train_gpu.examples())
    config = test_train_gpu.TrainConfig(
        model=str(out / "model"), data=str(out / "train.jsonl"), output_dir=str(out / "run"),
        max_steps=2, queries_per_step=8, micro_batch_tokens=512, lr=1e-3, optim="adamw", seed=0,
        plot=False, log_every=0, device="cpu",
    )  # fmt: skip
    train(config)
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    print("losses", [json.loads(line)["loss"] for line in lines])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
