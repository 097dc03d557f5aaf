"""The kernels' own error type (kernels/ imports nothing from ktnas.cache; callers translate it if they wish)."""


class KernelError(Exception):
    """A one-line refusal of the kernels: an unknown implementation or variant, an unusable device or dtype, a
    partial-channel factor that does not divide the channels. Its message says what to pass instead."""
