from setuptools import find_packages, setup

setup(
    name="megatron-sep",
    version="0.1.0",
    description="Megatron-style GPT pretraining with SepLLM sparse separator attention",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sep*", "fused_ops*", "data_tools*"]),
    package_data={"megatron_sep": ["../configs/*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "numpy",
        "pyyaml",
        "tqdm",
        "sentencepiece",
        "tokenizers",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "transformers", "wandb", "tensorboard", "triton"],
        "gpu": ["triton"],
        "wandb": ["wandb"],
        "deepspeed": ["deepspeed"],
    },
    entry_points={"console_scripts": ["megatron-sep=megatron_sep.cli:main"]},
)
