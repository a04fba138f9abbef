"""Packaging for plumage_ds.

torch is listed unpinned-from-below only: install ``torch==2.13.0`` (or the build you
need) *before* this package, as the Makefile does, so pip never resolves torch itself
(an unresolved torch pulls the newest CUDA wheels). Exact versions of everything else
are in ``constraints.txt`` (``pip install -c constraints.txt -e '.[dev,hf,deepspeed,data,plot]'``).
"""

from setuptools import find_packages, setup

setup(
    name="plumage_ds",
    version="0.1.0",
    description="Unbiased low-rank gradient estimators (PLUMAGE, GaLore, Haar, GUM) inside DeepSpeed, FSDP and DDP",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["plumage_ds", "plumage_ds.*"]),
    install_requires=["torch>=2.4", "pyyaml", "tqdm", "transformers", "safetensors", "tokenizers"],
    extras_require={
        "deepspeed": ["deepspeed"],
        "hf": ["transformers", "accelerate"],  # accelerate: required by transformers.Trainer
        "dev": ["pytest", "pytest-timeout", "hypothesis", "galore-torch"],
        "data": ["datasets"],  # data.source: hf_dataset (a dataset saved with save_to_disk)
        "plot": ["matplotlib"],  # plumage-ds plot, make demo, benchmarks/quality.py (its test runs in `make test`)
    },
    entry_points={"console_scripts": ["plumage-ds = plumage_ds.cli:main"]},
)
