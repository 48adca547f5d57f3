from setuptools import find_packages, setup

# torch is pinned by the Makefile (TORCH_SPEC), so that GPU clusters can swap in a CUDA build.
setup(
    name="megatron_ztt",
    version="0.1.0",
    description="Distributed pretraining of Zero Token Transformers (looped transformers with "
    "zero-token attention and early exit) on megatron-core and DeepSpeed",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["megatron_ztt", "megatron_ztt.*"]),
    package_data={"megatron_ztt.export": ["hf_template/*.py"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",
        "deepspeed>=0.19,<0.20",
        "sentencepiece>=0.2",
        "numpy",
        "tensorboard",
        "omegaconf>=2.3",
        "pyyaml",
        "tqdm",
        "transformers>=5.0,<6",
        "tokenizers",
        "safetensors",
        "matplotlib",  # ztt plot
        "pyarrow",  # parquet and arrow (datasets folder) corpora
        "zstandard",  # .jsonl.zst / .json.zst corpora
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "datasets"],  # datasets: writes save_to_disk folders
        "wandb": ["wandb"],  # logging.wandb_project
        "import": ["gguf", "accelerate"],  # ztt import-hf --gguf (transformers needs both)
    },
    entry_points={"console_scripts": ["ztt=megatron_ztt.cli:main"]},
)
