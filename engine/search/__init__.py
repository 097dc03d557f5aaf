"""``ktnas search``: the loop (:mod:`.loop`: config, data, resume, files), one search's model, optimisers and steps
(:mod:`.run`), the supernet (:mod:`.supernet`), how a step runs (:mod:`.capture`: CUDA graph, torch.compile) and
the batch size a memory budget allows (:mod:`.memory`)."""
from .loop import SearchConfig, resolve_config, search

__all__ = ["SearchConfig", "resolve_config", "search"]
