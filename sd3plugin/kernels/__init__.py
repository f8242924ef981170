"""Kernels and the SD3 attention processor: FlashAttention-4 (``fa4``), FlashAttention-3 (``fa3``, bf16 and
fp8), the joint-attention op, the 8-bit attention kernel, the GELU matmul epilogue, FA4's compile in a child
process. No transform logic here: ``sd3plugin.transforms`` decides where they run."""
