"""Kernels that no default path runs and no benchmark has chosen yet, kept selectable for measurement.

* :mod:`.qmatmul`: the in-loop 4-bit QLoRA GEMM (``PEFTFAST_QLORA_GEMM=inloop``); the default is
  dequantize + ``matmul.matmul_lowrank``.

These modules import Triton; only Triton modules import them.
"""
