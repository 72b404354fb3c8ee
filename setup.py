from setuptools import find_packages, setup

# Ranges, not pins (the pins are constraints.txt, which `make` installs). Lower bounds are versions the
# suite has passed with: the lock, torch 2.11 on the GPU machines, and `make test-hf` for transformers
# 4.57.6 with tokenizers 0.22.2. No upper bounds: no newer major is known to break.
setup(
    name="megatron-sep",
    version="0.1.0",
    description="Megatron-style GPT pretraining with SepLLM sparse separator attention",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sep*", "fused_ops*", "data_tools*"]),
    package_data={"megatron_sep": ["../configs/*.yaml"]},
    install_requires=[
        "torch>=2.11",
        "numpy>=2.4",
        "pyyaml>=6.0",
        "tqdm>=4.70",
        "sentencepiece>=0.2.1",
        "tokenizers>=0.22.2",
        "safetensors>=0.8",
        "matplotlib>=3.10",  # the PNG plots of eval (loss by position, streaming perplexity, KV memory)
    ],
    extras_require={
        "test": [
            "pytest>=9.0",
            "pytest-timeout>=2.4",
            "pytest-xdist>=3.8",
            "ruff>=0.17",
            "packaging>=26.0",
            "transformers>=4.57.6",
            "wandb>=0.31",
            "tensorboard>=2.21",
            "triton>=3.6",
            "torchao>=0.17",
            # megatron-core's own builder, checkpoint writer and forward are the references of the Megatron
            # compatibility tests; psutil is what its checkpoint writer needs
            "megatron-core>=0.16.1",
            "psutil>=7",
            "deepspeed>=0.19.8",
        ],  # parallel.engine: deepspeed, on DeepSpeed's CPU path
        "gpu": ["triton>=3.6"],
        "fp8": ["torchao>=0.17"],  # train.precision: fp8 (torchao's float8 training)
        "wandb": ["wandb>=0.31"],
        "tensorboard": ["tensorboard>=2.21"],  # logging.tensorboard: true
        "deepspeed": ["deepspeed>=0.19.8"],  # parallel.engine: deepspeed (ZeRO-2/3, CPU offload)
    },
    entry_points={"console_scripts": ["megatron-sep=megatron_sep.cli:main"]},
)
