"""What a search algorithm provides, in the spirit of NASLib's ``optimizers/``: its own options (a dataclass with
its paper's defaults and help), its paper's values of the shared hyper-parameters, the supernet it needs, one
``step`` (what ``ktnas bench search`` times), the architecture to evaluate, the final genotype, per-epoch
information and its state for checkpoints. The loop (data, DDP, resume, files), the CLI and the benchmarks know no
algorithm: they read these from the registry."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ktnas.cache.errors import KtnasError
from ktnas.cache.flags import check_positive, flag_name
from ktnas.engine import distributed

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


@dataclasses.dataclass
class NoOptions:
    """An algorithm without options of its own."""


class Algorithm:
    """One search algorithm on a run (``run.model``, ``run.cfg``, ``run.loss``, ``run.weight_step``, ...); its own
    options are ``self.opts``, an ``Options`` built from ``run.cfg.options``.

    Subclasses set ``name``, ``defaults`` (the paper's values of the shared hyper-parameters the config leaves
    ``None``), ``Options`` (a dataclass of the algorithm's own options: each field's default is its paper's, its
    ``metadata`` the flag's help and choices, as :mod:`ktnas.cache.flags` reads them) and ``variants`` (named
    option sets the benchmarks run, e.g. DARTS' first and second order), and override what differs from DARTS'
    first order."""
    name: str = ""
    defaults: dict = DARTS_DEFAULTS
    Options: type = NoOptions
    variants: dict | None = None  # {label: options}; None: one variant, the algorithm's name with its defaults
    uses_arch_optimizer = True  # False: no architecture parameters learn by gradient (random search)
    paper_warmup = 0        # the epochs of the paper's search before the architecture parameters train
    capturable = True       # its step has a fixed shape when run.fixed_arch (``--capture graph|compile``)
    capture_refusal = ""    # why not, when it is not
    dense_grads = False     # every weight gets a gradient each step (zeros for the ops a sample leaves out)

    def __init__(self, run):
        self.run, self.cfg, self.model = run, run.cfg, run.model
        self.opts = self.Options(**run.cfg.options)
        self.a_opt = torch.optim.Adam(self.model.arch_parameters(), self.cfg.arch_lr, betas=self.cfg.arch_betas,
                                      weight_decay=self.cfg.arch_weight_decay)

    # ----------------------------------------------------------------------------------------- configuration
    @classmethod
    def options(cls, given: dict | None = None):
        """``Options`` from a ``{name: value}`` dict (the missing ones take their defaults); one-line KtnasError
        for a name that is not one of this algorithm's options."""
        given = dict(given or {})
        own = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(given) - own)
        if unknown:
            owners = [n for n, a in ALGORITHMS.items() if unknown[0] in {f.name for f in dataclasses.fields(a.Options)}]
            whose = f"an option of {', '.join(owners)}" if owners else "no algorithm's option"
            fix = f": use --algo {owners[0]}" if owners else f" ({cls.name}'s: {', '.join(sorted(own)) or 'none'})"
            raise KtnasError(f"--{flag_name(cls.Options, unknown[0])} is {whose}, not of --algo {cls.name}{fix}")
        return cls.Options(**given)

    @classmethod
    def resolve(cls, cfg, opts) -> None:
        """Fill and check what this algorithm derives from the config (after the paper defaults): ``opts`` is its
        ``Options``, changed in place; every int option must be a positive integer unless its field's metadata
        says ``min=0`` (or it is None)."""
        for f in dataclasses.fields(opts):
            v = getattr(opts, f.name)
            choices = f.metadata.get("choices")
            if choices is not None and v not in choices:
                raise KtnasError(f"--{flag_name(opts, f.name)} {v!r} with --algo {cls.name}: use one of "
                                 f"{', '.join(map(str, choices))}")
            if isinstance(v, int) and not isinstance(v, bool):
                if f.metadata.get("min", 1) == 0:
                    if v < 0:
                        raise KtnasError(f"--{flag_name(opts, f.name)} must be 0 or more, got {v}")
                else:
                    check_positive(opts, (f.name,))

    @classmethod
    def arch_start(cls, cfg) -> int:
        """The first epoch whose steps train the architecture parameters: the ``warmup`` option of the algorithms
        that have one (0: from the start)."""
        return cfg.options.get("warmup") or 0

    @classmethod
    def all_variants(cls) -> dict[str, dict]:
        """``{label: options}`` of the variants the benchmarks run."""
        return dict(cls.variants) if cls.variants else {cls.name: {}}

    @classmethod
    def supernet_options(cls, cfg) -> dict:
        """Keyword arguments of the Supernet this algorithm searches (partial channels, edge normalisation)."""
        return {}

    # --------------------------------------------------------------------------------------------- steps
    def arch_step(self, xt, yt, xv, yv, arch=None) -> None:
        """An Adam step of the architecture parameters on the validation batch (first order)."""
        self.a_opt.zero_grad(set_to_none=True)
        loss = self.run.loss(xv, yv, arch)[0]
        if getattr(self.run, "budget", None) is not None:  # --budget: the expected cost over it, weighed
            loss = loss + self.run.budget.penalty(self.model.alphas())
        loss.backward()
        for p in self.model.weight_parameters():  # the weight step must not see the validation gradient
            p.grad = None
        if self.run.ddp:
            distributed.all_reduce_grads(self.model.arch_parameters())
        self.a_opt.step()

    def step(self, epoch: int, xt, yt, xv, yv, gen: torch.Generator, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """One search step on a training and a validation batch; returns the weight step's (loss, logits),
        detached. DARTS: an architecture step (from :meth:`arch_start` on), then a weight step."""
        if epoch >= self.arch_start(self.cfg):
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
    """Add an algorithm to ``ktnas search --algo``, ``ktnas bench search/step/accuracy`` and the rest (usable as a
    class decorator)."""
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    ALGORITHMS[cls.name] = cls
    return cls


def algorithm_variants() -> dict[str, tuple[str, dict]]:
    """``{label: (algorithm, options)}`` of every registered algorithm's benchmark variants."""
    return {label: (name, opts) for name, a in ALGORITHMS.items() for label, opts in a.all_variants().items()}


def resolve_variant(label: str) -> tuple[str, dict]:
    """``(algorithm, options)`` of a benchmark variant's label (``darts-2``), or of an algorithm's name (its
    defaults); a one-line KtnasError naming the labels otherwise."""
    variants = algorithm_variants()
    if label in variants:
        return variants[label]
    if label in ALGORITHMS:
        return label, {}
    raise KtnasError(f"unknown algorithm {label!r}: use one of {', '.join(variants)} (or an algorithm's name: "
                     f"{', '.join(ALGORITHMS)})")


def variant_argv(label: str) -> list[str]:
    """The ``ktnas search`` flags of a benchmark variant (or an algorithm's name): ``--algo NAME`` and its
    options' flags."""
    name, options = resolve_variant(label)
    opts = ALGORITHMS[name].Options
    return ["--algo", name, *(a for k, v in options.items() for a in (f"--{flag_name(opts, k)}", str(v)))]
