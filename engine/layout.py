"""One layout rule for the supernet and the evaluation network: which cells the frozen stem replaces.

The papers' networks run three stages at 32, 16 and 8 px (CIFAR input), split by reductions. A frozen stem whose
features are ``resolution`` px replaces every stage that runs above that resolution, together with the reduction
that ends it; a trainable adapter feeds the rest. ``--layers`` always means the cells the network is built with
(NB201: its reduction blocks included), ``--channels`` the width of its first cells; left unset, both come from
the paper's network (``space.reference``) minus what the stem replaces.
"""
from __future__ import annotations

from dataclasses import dataclass

from ktnas.cache.errors import KtnasError

REFERENCE_SIZE = 32  # the papers' networks run their three stages at 32, 16 and 8 px
STAGES = 3


@dataclass(frozen=True)
class Layout:
    """A network as built: ``layers`` cells of which those at ``reductions`` halve the resolution and double the
    width, ``channels`` the first cells' width; ``replaced`` the paper network's cells the stem stands in for and
    ``stages`` how many of its three stages remain."""
    layers: int
    channels: int
    reductions: tuple[int, ...]
    replaced: int = 0
    stages: int = STAGES

    def as_dict(self) -> dict:
        return dict(layers=self.layers, channels=self.channels, reductions=list(self.reductions))


def dropped_stages(resolution: int | None) -> int:
    """Stages of the paper's network that ran above ``resolution`` (at most 2; None: raw images, none)."""
    if resolution is None:
        return 0
    return sum(REFERENCE_SIZE >> k > resolution for k in range(STAGES - 1))


def resolve_layout(space, resolution: int | None, purpose: str = "search", *, layers: int | None = None,
                   channels: int | None = None, reductions=None, reference: tuple[int, int] | None = None) -> Layout:
    """The built layout for features of ``resolution`` px (None: the classic conv stem on images).

    ``reference`` (layers, channels) of the paper's network (default ``space.reference[purpose]``); ``layers``
    given (and unlike the default) without ``reductions`` splits it into the remaining stages by the space's rule.
    """
    default = space.reference[purpose]
    ref_layers, ref_C = (v if v is not None else w for v, w in zip(reference or default, default))
    d = dropped_stages(resolution)
    ref_reds = space.reductions(ref_layers, STAGES)
    start = ref_reds[d - 1] + 1 if d else 0
    built = ref_layers - start
    reds = tuple(r - start for r in ref_reds if r >= start)
    if layers is not None and layers != built and reductions is None:
        reds = space.reductions(layers, STAGES - d)
    built = built if layers is None else int(layers)
    reds = reds if reductions is None else tuple(sorted({int(r) for r in reductions}))
    C = ref_C * 2 ** d if channels is None else int(channels)
    if built < 1 or C < 1 or any(not 0 <= r < built for r in reds):
        raise KtnasError(f"bad layout: layers={built}, channels={C}, reductions={list(reds)}: pass --layers >= 1, "
                         f"--channels >= 1 and reduction positions in 0..{built - 1}")
    return Layout(built, C, reds, start, STAGES - d)
