"""``ktnas train``, ``evaluate``, ``predict`` and ``export``: the evaluation network of a genotype (:mod:`.network`),
its training loop (:mod:`.loop`) and what runs the trained model (:mod:`.evaluate`, :mod:`.predict`,
:mod:`.export`)."""
from .loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
