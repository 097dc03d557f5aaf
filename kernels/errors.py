"""The kernels' error type: ktnas' one error type (``ktnas.cache.errors``, the one module every package may import),
named for where it comes from."""
from ktnas.cache.errors import KtnasError


class KernelError(KtnasError):
    """A one-line refusal of the kernels: an unknown implementation or variant, an unusable device or dtype, a
    partial-channel factor that does not divide the channels. Its message says what to pass instead."""
