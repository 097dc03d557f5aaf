"""ktnas.kernels: fused mixed operations (Triton kernels, their PyTorch reference, autograd wrappers)."""
from .errors import KernelError
from .mixed import DISPATCH, KernelFallback, first_use_failures, mixed_op, observe_dispatch, resolve_impl
from .reference import edge_relu, mixed_op_reference, mixed_op_reference_gdas, mixed_op_reference_pc

__all__ = ["DISPATCH", "KernelError", "KernelFallback", "edge_relu", "first_use_failures", "mixed_op",
           "mixed_op_reference", "mixed_op_reference_gdas", "mixed_op_reference_pc", "observe_dispatch", "resolve_impl"]
