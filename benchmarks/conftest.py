"""pytest-benchmark tests over the harness of `python -m tritformer bench` (tritformer.bench).

    pytest benchmarks/ --benchmark-only            # measure (GPU: compiled kernels)
    pytest benchmarks/ --benchmark-disable         # smoke: each body runs once (CI)

On a machine without CUDA the kernels run in Triton's interpreter: the times are interpreter
times and say nothing about GPU speed.
"""
from tritformer import bench

DEVICE = bench.setup_device()  # before anything imports the kernels: TRITON_INTERPRET on CPU
