"""What the GPU runs import and train, with the packages the GPU machine lacks made unimportable.

`python tests/gpu_machine_check.py OUT_DIR` (from the repository root; tests/test_gpu_runs.py runs
it): every test file the GPU scripts' parts name (benchmarks/gpu_plan.py) collects, every benchmark
script they start imports,
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
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
    import gpu_plan

    ctx = gpu_plan.Context(out_dir=str(out))
    scripts = " ".join(" ".join(p.command(ctx)) for s in gpu_plan.SCRIPTS for p in gpu_plan.parts(s))
    files = sorted(set(re.findall(r"tests/test_\w+\.py", scripts)))
    assert pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files]) == 0
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
