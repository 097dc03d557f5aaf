"""What a search algorithm provides, in the spirit of NASLib's ``optimizers/``: its paper's defaults, the supernet
it needs, one ``step`` (what ``ktnas bench search`` times), the architecture to evaluate, the final genotype,
per-epoch information and its state for checkpoints. The loop (data, DDP, resume, files) knows no algorithm."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed

DARTS_DEFAULTS = dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, weight_decay=3e-4, nesterov=False,
                      arch_lr=3e-4)  # DARTS (Liu et al. 2019), train_search.py


def one_hot_arch(model, genotype, scale: float = 1.0) -> dict:
    """{cell type: (one-hot weights [E, K] times ``scale``, op index per edge)} of a genotype; the edges it does
    not use get 'none'."""
    dev = next(iter(model.alphas().values())).device
    return {t: (F.one_hot(torch.tensor(idx), len(model.space.ops)).float().to(dev) * scale, idx)
            for t, idx in model.space.encode(genotype).items()}


def derive(model):
    """The genotype of the model's architecture weights (PC-DARTS: ranked by softmax(alpha) * edge weight)."""
    alphas = {t: p.detach().double().cpu() for t, p in model.alphas().items()}
    edge_w = None
    if model.edge_norm:
        edge_w = {t: model.edge_weights(t).detach().double().cpu() for t in alphas}
    return model.space.derive(alphas, edge_w)


class Algorithm:
    """One search algorithm on a run (``run.model``, ``run.cfg``, ``run.loss``, ``run.weight_step``, ...).

    Subclasses set ``name``, ``defaults`` (the paper's hyper-parameters for the config's ``None`` fields) and
    ``orders``, and override what differs from DARTS' first order."""
    name: str = ""
    defaults: dict = DARTS_DEFAULTS
    orders: tuple[int, ...] = (1,)
    uses_arch_optimizer = True
    capturable = True       # its step has a fixed shape when run.fixed_arch (``--capture graph|compile``)
    capture_refusal = ""    # why not, when it is not
    dense_grads = False     # every weight gets a gradient each step (zeros for the ops a sample leaves out)

    def __init__(self, run):
        self.run, self.cfg, self.model = run, run.cfg, run.model
        self.a_opt = torch.optim.Adam(self.model.arch_parameters(), self.cfg.arch_lr, betas=self.cfg.arch_betas,
                                      weight_decay=self.cfg.arch_weight_decay)

    # ----------------------------------------------------------------------------------------- configuration
    @classmethod
    def resolve(cls, cfg) -> None:
        """Fill what this algorithm derives from the config (after the paper defaults)."""
        if cfg.warmup is None:
            cfg.warmup = 0

    @classmethod
    def supernet_options(cls, cfg) -> dict:
        """Keyword arguments of the Supernet this algorithm searches (partial channels, edge normalisation)."""
        return {}

    # --------------------------------------------------------------------------------------------- steps
    def arch_step(self, xt, yt, xv, yv, arch=None) -> None:
        """An Adam step of the architecture parameters on the validation batch (first order)."""
        self.a_opt.zero_grad(set_to_none=True)
        self.run.loss(xv, yv, arch)[0].backward()
        for p in self.model.weight_parameters():  # the weight step must not see the validation gradient
            p.grad = None
        if self.run.ddp:
            distributed.all_reduce_grads(self.model.arch_parameters())
        self.a_opt.step()

    def step(self, epoch: int, xt, yt, xv, yv, gen: torch.Generator, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """One search step on a training and a validation batch; returns the weight step's (loss, logits),
        detached. DARTS: an architecture step (from ``warmup`` on), then a weight step."""
        if epoch >= self.cfg.warmup:
            self.arch_step(xt, yt, xv, yv)
        return self.run.weight_step(xt, yt)

    def seed_device(self, epoch: int) -> None:
        """Seed what the step draws on the device under ``--capture graph`` (nothing for DARTS)."""

    # ------------------------------------------------------------------------------------------- results
    def epoch_info(self, epoch: int) -> dict:
        """What the epoch's metrics record besides losses (e.g. GDAS' temperature)."""
        return {}

    def eval_arch(self, epoch: int):
        """A function giving the architecture the validation pass runs under (None: the relaxation)."""
        return lambda: None

    def genotype(self, epoch: int, val, files) -> tuple[object | None, dict]:
        """(the genotype after ``epoch`` or None when there is none yet, what the epoch's metrics add);
        ``files``: the run directory, for extra results."""
        return derive(self.model), {}

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"a_opt": self.a_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.a_opt.load_state_dict(state["a_opt"])


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Add an algorithm to ``ktnas search --algo`` (usable as a class decorator)."""
    ALGORITHMS[cls.name] = cls
    return cls
