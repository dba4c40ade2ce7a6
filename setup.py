"""Package metadata. Pins live in requirements/constraints.txt, shared with the Makefile and Docker."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[line.split("==")[0].lower()] = line
    return pins


PINS = _pins()
RUNTIME = ["torch", "megatron-core", "deepspeed", "webdataset", "wids", "mlflow", "submitit", "pyyaml",
           "transformers", "tokenizers", "safetensors", "numpy", "tqdm", "ninja", "datasets", "pyarrow"]
TEST = ["pytest", "pytest-timeout", "pytest-xdist", "execnet"]

setup(
    name="megatron_lomdm",
    version="0.1.0",
    description="Distributed training of masked diffusion language models with a learned generation order (LoMDM)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_lomdm", "megatron_lomdm.*"]),
    install_requires=[PINS[name] for name in RUNTIME],
    extras_require={
        "test": [PINS[name] for name in TEST],
        # GPU-only pieces: never imported at module top level; the Docker image provides them.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "lomdm-train=megatron_lomdm.train:main",
        ]
    },
)
