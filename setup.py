from setuptools import setup

setup(
    name="tritformer",
    version="0.1.0",
    description="Triton kernels for transformer layers (fused attention forward and backward), "
                "as drop-in PyTorch autograd functions",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # kernels/ is installed as tritformer.kernels; the rest of the package lives in python/
    package_dir={"tritformer": "python/tritformer", "tritformer.kernels": "kernels"},
    packages=["tritformer", "tritformer.ops", "tritformer.nn", "tritformer.models",
              "tritformer.integrations", "tritformer.bench", "tritformer.testing",
              "tritformer.kernels", "tritformer.kernels.attention"],
    # Install torch first (see README): a bare `torch` requirement on a machine without torch
    # pulls a multi-GB CUDA build. torch 2.13 is what CI tests (no older torch is tested, so none
    # is allowed); Triton 3.7.1 is what torch 2.13's CUDA build pins.
    install_requires=["torch>=2.13", "triton>=3.7.1,<3.10", "numpy"],
    extras_require={
        # `python -m tritformer bench` (plots: matplotlib) and benchmarks/ (pytest-benchmark)
        "bench": ["matplotlib", "pytest-benchmark"],
        # transformers: below the next major version, since the integration uses semi-internal
        # names (AttentionInterface, masking utilities); 5.4 is the oldest that passes the HF
        # tests (5.3: mask functions take other arguments; 4.x: no is_tracing), and CI runs them
        # on 5.4.0 (.ci/run); 5.25+ also brings Hugging Face's
        # `kernels` package, which this package's own kernels/ does not shadow
        "hf": ["transformers>=5.4,<6", "safetensors"],
        # hypothesis pinned: CI's fuzz tests draw derandomized examples, which a new release
        # may change; a deeper search is TRITFORMER_FUZZ_EXAMPLES (README)
        "test": ["pytest>=8", "pytest-xdist", "expecttest", "pytest-benchmark", "matplotlib",
                 "hypothesis==6.170.15", "transformers>=5.4,<6", "safetensors",
                 "ruff==0.14.0"],
    },
    entry_points={"console_scripts": ["tritformer=tritformer.cli:main"]},
)
