"""``ktnas evolve``: sample-based search. The loop (:mod:`.loop`), the candidates trained for real
(:mod:`.candidates`), what proposes them (:mod:`.proposers`) and the learned rankers (:mod:`.predictor`,
:mod:`.predictor_dcl`)."""
from .loop import EvolveConfig, evolve

__all__ = ["EvolveConfig", "evolve"]
