"""ktnas.kernels: fused mixed operations (Triton kernels, their PyTorch reference, autograd wrappers)."""
