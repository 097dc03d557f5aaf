"""A budget on the found model's cost: ``--budget params=1.5M,flops=300M,latency=4ms`` (any subset; FLOPs as the
NAS papers count them, multiply-adds of one image; latency as a latency table predicts it on its runtime), for the
exported model at its training layout (frozen stem included).

:func:`parse_budget` reads the flag. :func:`derive_within` is the derivation under a budget: the genotype the
space's own derivation would pick when it fits, else the one with the largest sum of architecture weights over its
chosen (edge, op) pairs among those that fit, found exactly: per node the space's choices (DARTS: 2 of its input
edges and an op on each; NAS-Bench-201: an op on every edge), merged node by node keeping only the choices no
other beats in both cost and weight (a Pareto front), then the cell types combined. Maximising that sum without a
budget is the space's own derivation (per node the strongest edges, per edge the strongest op)."""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import numpy as np
import torch

from ktnas.cache.errors import KtnasError

KEYS = {"params": 0, "flops": 1, "latency": 2}  # index into a BudgetModel's (weights, multiply-adds, ms)
SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
TIME = {"": 1.0, "ms": 1.0, "us": 1e-3, "s": 1e3}  # latency in ms
MAX_DRAWS = 10_000  # a sample-based search's draws of a genotype that fits before giving up


def parse_budget(text: str | None) -> dict[str, float]:
    """``"params=1.5M,flops=300M,latency=4ms"`` -> {"params": 1.5e6, "flops": 3e8, "latency": 4.0} (latency in ms;
    also us and s); None or "" -> {}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        m = re.fullmatch(r"(\w+)\s*=\s*([0-9.]+(?:e-?\d+)?)\s*([a-zA-Z]*)", part)
        unit = m and m.group(3).lower()
        ok = m and m.group(1) in KEYS and (unit in TIME if m.group(1) == "latency" else unit in SCALE)
        if not ok:
            raise KtnasError(f"--budget {text!r}: give KEY=VALUE pairs, KEY one of {', '.join(KEYS)} (e.g. "
                             "params=1.5M,flops=300M,latency=4ms)")
        value = float(m.group(2)) * (TIME if m.group(1) == "latency" else SCALE)[unit]
        if value <= 0:
            raise KtnasError(f"--budget {part!r}: the limit must be positive")
        out[m.group(1)] = value
    return out


def budget_text(values: dict) -> str:
    """{"params": 1e6, "latency": 4.0} -> "params=1,000,000,latency=4ms"."""
    return ",".join(f"{k}={v:.4g}ms" if k == "latency" else f"{k}={v:,.0f}" for k, v in values.items())


class BudgetModel:
    """Every budgeted quantity of a genotype as ``fixed + Σ_cell types Σ_edges table[edge, op]``: weights and
    multiply-adds from the exact :class:`~ktnas.engine.profile.cost.CostModel`, and with a latency table the
    predicted milliseconds of its :class:`~ktnas.engine.profile.latency_table.LatencyModel` (0 without one).
    ``table[t]`` is [edges, ops, 3], ``fixed`` [3], both float64, the frozen stem included."""

    def __init__(self, cost, latency=None):
        self.space, self.cost_model, self.latency_model = cost.space, cost, latency
        ms = {t: latency.table[t] if latency else np.zeros(c.shape[:2]) for t, c in cost.table.items()}
        self.table = {t: np.concatenate([c.astype(np.float64), ms[t][..., None]], axis=-1)
                      for t, c in cost.table.items()}
        self.fixed = np.array([cost.fixed[0] + cost.stem.params, cost.fixed[1] + cost.stem.macs,
                               latency.fixed if latency else 0.0])

    def cost(self, genotype):
        """The genotype's exact :class:`~ktnas.engine.profile.cost.Cost`."""
        return self.cost_model.cost(genotype)

    def values(self, genotype) -> dict[str, float]:
        """{"params", "flops"} exact, and "latency" (ms, predicted) with a latency table."""
        c = self.cost(genotype)
        out = {"params": float(c.params), "flops": float(c.macs)}
        if self.latency_model is not None:
            out["latency"] = self.latency_model.predict(genotype)
        return out


def pareto(cost: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices of the entries no other entry beats (cost <= in every column and score >=, one strictly; of equal
    entries the first), best score first."""
    order = np.lexsort((*cost.T[::-1], -score))  # best score first; equal scores: cheapest first
    if cost.shape[1] == 1:  # one budget: keep what is cheaper than everything scoring higher
        c = cost[order, 0]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], c[:-1]]))
        return order[c < best_before]
    keep, kept = [], np.empty((len(order), cost.shape[1]))
    for i in order:
        if not keep or not np.any(np.all(kept[:len(keep)] <= cost[i], axis=1)):
            kept[len(keep)] = cost[i]
            keep.append(i)
    return np.asarray(keep, dtype=int)


def node_options(w: np.ndarray, table: np.ndarray, edges: list[int], picks: int, pickable: list[int]):
    """(cost [n, d], score [n], choices: tuple of (edge, op)) of every way a node may take its inputs."""
    costs, scores, choices = [], [], []
    for chosen in itertools.combinations(edges, picks):
        for ops in itertools.product(pickable, repeat=picks):
            pairs = tuple(zip(chosen, ops))
            costs.append(sum(table[e, k] for e, k in pairs))
            scores.append(sum(w[e, k] for e, k in pairs))
            choices.append(pairs)
    return np.asarray(costs, dtype=np.float64), np.asarray(scores), choices


def cell_front(w: np.ndarray, table: np.ndarray, nodes: list[list[int]], picks, pickable: list[int]):
    """The Pareto front (cost, score, choices) of one cell: ``w`` [edges, ops] weights, ``table`` [edges, ops, d]
    costs, ``nodes`` each node's edges, ``picks`` per node (None: all its edges)."""
    cost, score, choices = np.zeros((1, table.shape[-1])), np.zeros(1), [()]
    for edges in nodes:
        oc, os_, och = node_options(w, table, edges, picks or len(edges), pickable)
        keep = pareto(oc, os_)
        oc, os_, och = oc[keep], os_[keep], [och[i] for i in keep]
        cost = (cost[:, None, :] + oc[None, :, :]).reshape(-1, cost.shape[1])
        score = (score[:, None] + os_[None, :]).reshape(-1)
        choices = [a + b for a in choices for b in och]
        keep = pareto(cost, score)
        cost, score, choices = cost[keep], score[keep], [choices[i] for i in keep]
    return cost, score, choices


def best_within(fronts: list, limit: np.ndarray):
    """The best total score of one entry per front whose summed cost is within ``limit``: (score, choices per
    front) or None when nothing fits."""
    cost, score, picks = np.zeros((1, len(limit))), np.zeros(1), [()]
    for c, s, ch in fronts:
        tc = (cost[:, None, :] + c[None, :, :]).reshape(-1, len(limit))
        ts = (score[:, None] + s[None, :]).reshape(-1)
        fits = np.all(tc <= limit, axis=1)
        if not fits.any():
            return None
        idx = np.flatnonzero(fits)
        tp = [picks[i // len(s)] + (ch[i % len(s)],) for i in idx]
        keep = pareto(tc[idx], ts[idx])
        cost, score, picks = tc[idx][keep], ts[idx][keep], [tp[i] for i in keep]
    best = int(np.argmax(score))
    return float(score[best]), picks[best]


def derive_within(space, weights: dict, model, budget: dict, derive=None):
    """The genotype under ``budget`` ({"params"/"flops": limit}) for op weights ``weights`` {cell type: [edges,
    ops]} (softmax, PC-DARTS' edge weights applied) and a :class:`~ktnas.engine.profile.cost.CostModel`
    ``model``. The space's own derivation when it fits; KtnasError (one line) when no genotype can."""
    genotype = derive() if derive else None
    dims = [KEYS[k] for k in budget]
    if genotype is not None and fits_values(model.values(genotype), budget):
        return genotype
    fixed = model.fixed
    limit = np.asarray([budget[k] for k in budget]) - fixed[dims]
    nodes, picks = node_groups(space), 2 if space.chooses_inputs else None
    types = list(weights)
    fronts = [cell_front(np.asarray(weights[t], dtype=np.float64), model.table[t][..., dims], nodes, picks,
                         space.pickable()) for t in types]
    found = best_within(fronts, limit)
    if found is None:
        least = fixed[dims] + sum(f[0].min(axis=0) for f in fronts)
        need = ", ".join(budget_text({k: v}) for k, v in zip(budget, least))
        raise KtnasError(f"no genotype of the {space.name} space fits --budget {budget_text(budget)} at this layout "
                         f"(the smallest needs at least {need}): raise the budget or train a smaller network "
                         "(--train-layers, --train-channels)")
    alphas = {}
    for t, choice in zip(types, found[1]):
        a = np.zeros(np.shape(weights[t]))
        for e, k in choice:  # derive reads these back: the chosen op, a node's edges ranked by their weight
            a[e, k] = 3.0 + 3.0 * float(weights[t][e, k])
        alphas[t] = a
    return space.derive(alphas)


def fits_values(values: dict, budget: dict) -> bool:
    return all(values[k] <= v for k, v in budget.items())


def node_groups(space) -> list[list[int]]:
    out, start = [], 0
    for n in space.node_edges():
        out.append(list(range(start, start + n)))
        start += n
    return out


class SearchBudget:
    """A search's budget: the penalty its architecture steps add, ``lam · Σ_k relu(E[cost_k] / limit_k − 1)`` over
    the budgeted costs (E[cost] the cost model's expected cost under softmax(alpha): ProxylessNAS' and FBNet's
    relaxation), with ``lam`` doubled after every epoch whose own derivation is over budget; and each epoch's
    genotype derived within it (:func:`derive_within`). ``model``: a :class:`BudgetModel`."""

    def __init__(self, space, limits: dict, model: BudgetModel, device):
        self.space, self.limits, self.model, self.lam = space, dict(limits), model, 1.0
        self.dims = [KEYS[k] for k in limits]
        kw = dict(device=device, dtype=torch.float32)
        self.tables = {t: torch.as_tensor(model.table[t][..., self.dims], **kw) for t in space.cell_types}
        self.fixed = torch.as_tensor(model.fixed[self.dims], **kw)
        self.limit = torch.as_tensor([limits[k] for k in limits], **kw)
        uniform = {t: np.full(model.table[t].shape[:2], 1.0 / len(space.ops)) for t in space.cell_types}
        derive_within(space, uniform, model, self.limits)  # refused now, before training, when nothing can fit

    def penalty(self, alphas: dict) -> torch.Tensor:
        expected = self.fixed + sum((torch.softmax(a, dim=-1)[..., None] * self.tables[t]).sum((0, 1))
                                    for t, a in alphas.items())
        return self.lam * torch.relu(expected / self.limit - 1).sum()

    def fits(self, genotype) -> bool:
        return fits_values(self.model.values(genotype), self.limits)

    def draw(self, make):
        """``make()`` (a random genotype, a mutant), called again until what it gives fits (sample-based searches
        under a budget); one-line KtnasError after MAX_DRAWS that do not."""
        for _ in range(MAX_DRAWS):
            g = make()
            if self.fits(g):
                return g
        raise KtnasError(f"none of {MAX_DRAWS} genotypes drawn fits --budget {budget_text(self.limits)}: raise the "
                         "budget")

    def record(self, genotype) -> dict:
        """The genotype's cost (weights, multiply-adds) and, with a latency table, its predicted latency."""
        v = self.model.values(genotype)
        return dict(self.model.cost(genotype).to_json(), **({"latency_ms": v["latency"]} if "latency" in v else {}))

    def constrain(self, genotype, weights: dict):
        """(the genotype within the budget, the epoch's record); raises ``lam`` when ``genotype`` is over it."""
        over = not self.fits(genotype)
        record = dict(limits=self.limits, penalty_weight=self.lam, derived_cost=self.record(genotype),
                      derived_fits=not over)
        if over:
            genotype = derive_within(self.space, weights, self.model, self.limits)
            self.lam *= 2.0
        record["cost"] = self.record(genotype)
        return genotype, record

    def state_dict(self) -> dict:
        return {"budget_lambda": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state.get("budget_lambda", 1.0))


SPOT_RUNTIME = "onnxruntime"  # what a latency budget without --latency-table measures on (CPU, batch 1)


def search_budget(cfg, info: dict, space, device, ddp: bool = False) -> SearchBudget | None:
    """The budget of a search on ``info``'s data (None without ``--budget``): the cost of the model ``ktnas train``
    builds from the found genotype (at ``--train-layers``/``--train-channels``), frozen stem included."""
    limits = parse_budget(cfg.budget)
    if not limits:
        return None
    if "latency" in limits and cfg.stem != "features":
        raise KtnasError("--budget latency=... is the latency of an exported model, which runs a frozen stem: search "
                         "on a feature store (--features), or budget params/flops with --stem none")
    if "latency" in limits and ddp and not cfg.latency_table:
        raise KtnasError("--budget latency=... under torchrun needs a table every rank reads: measure it first with "
                         "`ktnas bench latency` and pass --latency-table FILE")
    model = budget_model(space, info, cfg.stem == "features", store=cfg.features, layers=cfg.train_layers,
                         channels=cfg.train_channels, latency="latency" in limits, latency_table=cfg.latency_table,
                         out=cfg.out, progress=cfg.progress)
    return SearchBudget(space, limits, model, device)


def budget_model(space, info: dict, features: bool, *, store=None, layers=None, channels=None, latency=False,
                 latency_table=None, out=None, progress=True) -> BudgetModel:
    """The :class:`BudgetModel` of the network ``ktnas train`` builds on ``info``'s data at ``layers``/``channels``
    (None: its default). ``latency``: with the latency model of ``latency_table`` (a file from ``ktnas bench
    latency``) or, without one, of a table measured now into ``out``/latency-table.json (reused by a resumed run)."""
    from ktnas.engine.profile.cost import Cost, CostModel, count

    stem = Cost(0, 0)
    build = dict(num_classes=info["num_classes"], layers=layers, channels=channels)
    if features:
        import warnings

        from ktnas.cache.stems import get_stem

        with warnings.catch_warnings():  # random weights count the same: nothing is downloaded
            warnings.simplefilter("ignore")
            net = get_stem(info["stem"], "none", info["image_size"])
        p, m = count(net, torch.zeros(1, 3, info["image_size"], info["image_size"]))
        stem = Cost(p, m, p, m)
        build.update(in_channels=info["in_channels"], in_size=info["resolution"])
    lat = latency_model(space, store, layers, channels, latency_table, out, progress) if latency else None
    return BudgetModel(CostModel(space, {k: v for k, v in build.items() if v is not None}, stem), lat)


def latency_model(space, store, layers, channels, path=None, out=None, progress=True):
    """The LatencyModel of the model trained on ``store`` at ``layers``/``channels``: from the table ``path``
    (refused in one line when measured for another network), or measured now on the CPU at batch 1."""
    from ktnas.engine.profile.latency import Timer, measure_table
    from ktnas.engine.profile.latency_table import LatencyModel, LatencyTable, store_target

    target = store_target(store, space.name, layers=layers, channels=channels)
    if path:
        table = LatencyTable.load(path)
        table.require(target, path)
        return LatencyModel(table)
    spot = Path(out or ".") / "latency-table.json"
    table = LatencyTable.load(spot) if spot.exists() else None
    if table is not None:
        table.require(target, spot)
    runtime = SPOT_RUNTIME
    try:
        timer = Timer(runtime)
    except KtnasError as e:
        print(f"latency: {e}; measuring on torch instead", file=sys.stderr)
        runtime, timer = "torch", Timer("torch")
    def announce():
        print(f"latency: measuring the {space.name} ops of {target.describe()} on {runtime} (CPU) into {spot}; "
              "`ktnas bench latency` writes such a table once for --latency-table", file=sys.stderr)

    try:
        table = measure_table(target, timer, table=table, progress=progress, save=lambda t: t.save(spot),
                              announce=announce)
    finally:
        timer.close()
    table.save(spot)
    return LatencyModel(table)


def store_budget(text: str | None, space, store, device="cpu", *, layers=None, channels=None, latency_table=None,
                 out=None, progress=True) -> SearchBudget | None:
    """The budget of the models ``ktnas train`` builds on a feature store (``ktnas evolve --budget``)."""
    from ktnas.engine.data import feature_info

    limits = parse_budget(text)
    if not limits:
        return None
    model = budget_model(space, feature_info(store), True, store=store, layers=layers, channels=channels,
                         latency="latency" in limits, latency_table=latency_table, out=out, progress=progress)
    return SearchBudget(space, limits, model, device)


def derivation_weights(model) -> dict:
    """The op weights the space's derivation reads: softmax(alpha), times PC-DARTS' edge weights."""
    out = {}
    for t, a in model.alphas().items():
        w = torch.softmax(a.detach().double().cpu(), dim=-1)
        if model.edge_norm:
            w = w * model.edge_weights(t).detach().double().cpu()[:, None]
        out[t] = w.numpy()
    return out
