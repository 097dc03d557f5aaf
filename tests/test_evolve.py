"""engine.evolve: sample-based search (random, regularized evolution, predictor-guided) on real Fashion-MNIST
features; every candidate trained for real. Small budgets: tiny NB201 / DARTS candidates, a few hundred samples."""
import contextlib
import io
import json
import math
import os
import warnings

import numpy as np
import pytest
from conftest import one_line_error
import torch

from ktnas.cache.errors import KtnasError
from ktnas.cache.store import open_store
from ktnas.engine.cli import main as ktnas_main
from ktnas.engine.evolve.loop import (CandidateTrainer, EvolveConfig, arch_graph, evolve, fit_ranker, kendall_tau,
                                      mutate, predict_scores, pretrain_predictor, resolve_config)
from ktnas.engine.spaces import (DARTS_OPS, NB201_OPS, DartsGenotype, NB201Genotype, genotype_from_json, load_genotype,
                                 random_genotype)

FMNIST = "/usr/share/datasets/fashion-mnist"
# candidates: NB201 1 cell per stage, C=8 (16x16 and 8x8 stages on 16x16x16 features), 2 epochs on 512 samples,
# measured on 512 others: about 0.6 s each on one core, and their accuracies rank architectures (seed-to-seed
# Kendall tau about 0.6)
SMALL = dict(space="nb201", layers=3, channels=16, epochs_per_candidate=2, batch_size=16, lr=0.025, limit=1024,
             progress=False, device="cpu", pretrain_archs=256, pretrain_steps=100, fit_steps=100, pool=30)
TINY = dict(SMALL, limit=192, epochs_per_candidate=1, batch_size=32)


def strip(history):
    """What a resumed run must reproduce: everything but the timings."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "group_seconds")} for r in history]


def read_history(run):
    return [json.loads(line) for line in (run / "candidates.jsonl").read_text().splitlines()]


def cli(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ktnas_main([str(a) for a in argv]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Real Fashion-MNIST: 1024 training (and test, for `ktnas train`) images through ImageNet MobileNetV2
    features.1 at 32 px (16x16x16 features)."""
    if not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")):
        pytest.skip("Fashion-MNIST files (dataset-fashion-mnist) not installed")
    from ktnas.cache.precompute import precompute

    out = tmp_path_factory.mktemp("evolve-store") / "f.zarr"
    try:
        precompute(dataset="fashion-mnist", stem="mobilenet_v2:features.1", weights="imagenet", image_size=32,
                   out=str(out), limit=1024, progress=False)
    except KtnasError as e:
        if "ImageNet weights" in str(e):
            pytest.skip(str(e))
        raise
    return str(out)


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory, one_thread):
    """One seeded run per algorithm on NB201 (random through the `ktnas evolve` command)."""
    d = tmp_path_factory.mktemp("evolve-runs")
    printed = cli("evolve", "--features", store, "--space", "nb201", "--algo", "random", "--population", 3,
                  "--cycles", 3, "--layers", 3, "--channels", 16, "--epochs-per-candidate", 2, "--batch-size", 16,
                  "--lr", 0.025, "--limit", 1024, "--device", "cpu", "--out", d / "random", "--quiet")
    evolve(EvolveConfig(features=store, out=str(d / "rea"), algo="rea", population=6, sample=3, cycles=10, **SMALL))
    evolve(EvolveConfig(features=store, out=str(d / "predictor"), algo="predictor", population=10, sample=3,
                        cycles=18, parallel=2, cv_folds=4, **SMALL))
    return d, printed


# ------------------------------------------------------------------------------------------------ unit tests
def test_mutate_changes_exactly_one_thing():
    rng = np.random.default_rng(0)
    parent = NB201Genotype.from_string("|nor_conv_3x3~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|nor_conv_1x1~1|"
                                       "nor_conv_3x3~2|")
    for _ in range(50):
        child, what = mutate(parent, rng)
        diff = [(a, b) for na, nb in zip(parent.edges, child.edges) for a, b in zip(na, nb) if a != b]
        assert len(diff) == 1 and diff[0][0][1] == diff[0][1][1] and diff[0][1][0] in NB201_OPS, (diff, what)
    kinds = set()
    g = random_genotype("darts", rng)
    for _ in range(200):
        child, what = mutate(g, rng)
        pairs = [(c, i, tuple(p)) for c in ("normal", "reduce") for i, p in enumerate(getattr(g, c))]
        cpairs = [(c, i, tuple(p)) for c in ("normal", "reduce") for i, p in enumerate(getattr(child, c))]
        changed = {(c, i // 2) for (c, i, p), (_, _, q) in zip(pairs, cpairs) if p != q}
        assert len(changed) == 1, what  # one node of one cell
        cell, node = changed.pop()
        old, new = getattr(g, cell)[2 * node:2 * node + 2], getattr(child, cell)[2 * node:2 * node + 2]
        assert new[0][1] < new[1][1] and all(op != "none" and op in DARTS_OPS for op, _ in new)
        if sorted(j for _, j in old) == sorted(j for _, j in new):
            kinds.add("op")
            assert sum(a != b for a, b in zip(old, new)) == 1
        else:
            kinds.add("input")
            assert len({j for _, j in old} & {j for _, j in new}) == 1 and sorted(o for o, _ in old) == \
                sorted(o for o, _ in new)
        assert DartsGenotype.from_json(child.to_json()) == child
        g = child
    assert kinds == {"op", "input"}


def test_arch_graph(one_thread):
    g = NB201Genotype.from_string("|nor_conv_3x3~0|+|skip_connect~0|none~1|+|avg_pool_3x3~0|nor_conv_1x1~1|"
                                  "nor_conv_3x3~2|")
    types, adj = arch_graph(g)
    assert types.shape == (1, 8) and adj.shape == (1, 8, 8)
    names = ("in0", "out", *NB201_OPS)
    assert [names[t] for t in types[0]] == ["in0", "nor_conv_3x3", "skip_connect", "none", "avg_pool_3x3",
                                            "nor_conv_1x1", "nor_conv_3x3", "out"]
    # op nodes 1:(1<-0) 2:(2<-0) 3:(2<-1) 4:(3<-0) 5:(3<-1) 6:(3<-2); node 2's state = op nodes 2 + 3
    expect = {(1, 0), (2, 0), (3, 1), (4, 0), (5, 1), (6, 2), (6, 3), (7, 4), (7, 5), (7, 6)}
    assert {(int(i), int(j)) for i, j in adj[0].nonzero()} == expect
    d = DartsGenotype([("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_3x3", 0), ("max_pool_3x3", 2),
                       ("sep_conv_5x5", 2), ("avg_pool_3x3", 3), ("skip_connect", 1), ("sep_conv_3x3", 4)],
                      [2, 3, 4, 5], [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4, [2, 3, 4, 5])
    types, adj = arch_graph(d)
    assert types.shape == (2, 11) and adj.shape == (2, 11, 11)
    normal = {(int(i), int(j)) for i, j in adj[0].nonzero()}
    # slot 3 (node 1, input state 2 = node 0 = slots 0, 1); slot 5 (node 2, input 3 = node 1 = slots 2, 3)
    assert {(5, 2), (5, 3), (7, 4), (7, 5)} <= normal and (2, 0) in normal and (3, 1) in normal
    assert sum(1 for i, _ in normal if i == 10) == 8  # the output concatenates all four nodes
    assert int(adj[1].sum()) == 8 + 8  # reduce: every slot reads one cell input; output reads 8 slots


def test_kendall_tau_matches_the_pair_count():
    def reference(x, y):  # tau-b by counting pairs, ties as scipy.stats.kendalltau
        c = d = tx = ty = 0
        for i in range(len(x)):
            for j in range(i + 1, len(x)):
                a, b = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
                if a and b:
                    c, d = c + (a == b), d + (a != b)
                elif a:
                    ty += 1
                elif b:
                    tx += 1
        return (c - d) / math.sqrt((c + d + tx) * (c + d + ty))

    rng = np.random.default_rng(1)
    for _ in range(20):
        x, y = rng.integers(0, 5, 12).astype(float), rng.integers(0, 5, 12).astype(float)
        assert kendall_tau(x, y) == pytest.approx(reference(x, y))
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    one_line_error(lambda: kendall_tau([1, 2], [1, 2, 3]), "same length")


def test_predictor_pretraining_and_fit_are_deterministic_and_learn(one_thread):
    a = pretrain_predictor("darts", archs=64, steps=30, hidden=16, seed=3)
    b = pretrain_predictor("darts", archs=64, steps=30, hidden=16, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rng = np.random.default_rng(0)
    gs = [random_genotype("darts", rng) for _ in range(24)]
    # a synthetic target the graph determines: the number of separable convs in the normal cell
    target = [sum(op.startswith("sep") for op, _ in g.normal) for g in gs]
    m = fit_ranker(a, "darts", gs[:16], target[:16], steps=150, hidden=16, seed=0)
    m2 = fit_ranker(a, "darts", gs[:16], target[:16], steps=150, hidden=16, seed=0)
    s = predict_scores(m, gs)
    assert np.array_equal(s, predict_scores(m2, gs))
    assert kendall_tau(s[:16], target[:16]) > 0.6 and kendall_tau(s[16:], target[16:]) > 0.3


# ---------------------------------------------------------------------------------------------- on features
def test_lockstep_group_equals_one_at_a_time(store, one_thread):
    """Candidates trained together see the same batches and their own seeds: same results as trained alone."""
    cfg = resolve_config(EvolveConfig(features=store, **TINY))
    rng = np.random.default_rng(5)
    gs = [random_genotype("nb201", rng) for _ in range(3)]
    with open_store(store) as s:
        trainer = CandidateTrainer(cfg, s, "cpu")
        try:
            group = trainer.train(gs, [7, 8, 9])
            alone = [trainer.train([g], [i])[0] for g, i in zip(gs, [7, 8, 9])]
        finally:
            trainer.close()
    keys = ("val_acc", "val_loss", "train_acc", "train_loss", "params", "flops", "arch")
    assert [{k: r[k] for k in keys} for r in group] == [{k: r[k] for k in keys} for r in alone]
    assert group[0]["group_size"] == 3 and alone[0]["group_size"] == 1
    assert all(r["flops"] > r["params"] > 0 and not r["diverged"] for r in group)
    assert len({r["val_loss"] for r in group}) == 3  # three different networks


@pytest.mark.parametrize("algo", ["random", "rea", "predictor"])
def test_each_algorithm_writes_its_run_and_a_genotype_ktnas_train_takes(runs, algo, tmp_path):
    d, printed = runs
    run = d / algo
    for name in ("config.json", "candidates.jsonl", "genotype.json", "results.json", "accuracy.png",
                 "checkpoint.pt"):
        assert (run / name).is_file(), name
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    cfg = json.loads((run / "config.json").read_text())
    res = json.loads((run / "results.json").read_text())
    h = read_history(run)
    assert len(h) == cfg["population"] + cfg["cycles"] == res["candidates"] and res["complete"]
    assert [r["index"] for r in h] == list(range(len(h)))
    for r in h:
        assert 0 <= r["val_acc"] <= 100 and math.isfinite(r["val_loss"]) and r["params"] > 0 and r["seconds"] > 0
        assert genotype_from_json(r["genotype"]).to_string() == r["arch"]
    assert {r["origin"] for r in h} == ({"random"} if algo == "random" else
                                        {"random", "mutation" if algo == "rea" else "predictor"})
    best = max(h, key=lambda r: (r["val_acc"], -r["val_loss"], -r["index"]))
    g = load_genotype(run / "genotype.json")
    assert g.to_json() == best["genotype"] and res["best"]["index"] == best["index"]
    assert res["best_so_far"] == list(np.maximum.accumulate([r["val_acc"] for r in h]))
    assert res["candidates_per_hour"] > 0 and res["data"]["source"] == "cached features"
    assert cfg["data"]["train"] + cfg["data"]["val"] == 1024 and cfg["parallel"] >= 1
    if algo == "random":
        assert f"{len(h)} candidates (random, nb201)" in printed and "genotype" in printed
    out = cli("train", "--features", cfg["features"], "--genotype", run / "genotype.json", "--out", tmp_path / "train",
              "--epochs", 1, "--layers", 3, "--channels", 8, "--batch-size", 64, "--limit", 128, "--device", "cpu",
              "--quiet")
    assert "1/1 epochs" in out and (tmp_path / "train" / "model.pt").is_file()


def test_rea_improves_over_its_initial_population(runs):
    d, _ = runs
    h = read_history(d / "rea")
    P = 6
    initial, evolved = [r["val_acc"] for r in h[:P]], [r["val_acc"] for r in h[P:]]
    assert max(evolved) > max(initial), (initial, evolved)
    res = json.loads((d / "rea" / "results.json").read_text())
    assert res["best_so_far"][-1] > res["initial_best_acc"] == max(initial)
    for r in h[P:]:  # aging: each parent was in the population (the last P candidates) when its child was made
        assert r["index"] - P <= r["parent"] < r["index"] and r["mutation"]
        assert sum(a != b for a, b in zip(genotype_from_json(r["genotype"]).edges,
                                          genotype_from_json(h[r["parent"]]["genotype"]).edges)) == 1


def test_predictor_ranks_held_out_candidates(runs):
    d, _ = runs
    res = json.loads((d / "predictor" / "results.json").read_text())
    tau = res["predictor"]
    assert tau["candidates"] == 28 and len(tau["folds"]) == 4 and sum(tau["fold_sizes"]) == 28
    assert tau["kendall_tau"] == pytest.approx(np.mean(tau["folds"]))
    # the predictor orders candidates it was not fitted on by their measured accuracy: clearly above zero
    assert tau["kendall_tau"] > 0.2 and tau["kendall_tau"] - 2 * tau["stderr"] > 0, tau
    h = read_history(d / "predictor")
    picked = [r for r in h if r["origin"] == "predictor"]
    assert len(picked) == 18 and all(r["predicted_rank"] in (1, 2) and r["pool"] >= 2 for r in picked)
    seen = set()
    for r in h:  # the predictor only spends training on architectures not evaluated before
        key = json.dumps(r["genotype"], sort_keys=True)
        assert r["origin"] == "random" or key not in seen
        seen.add(key)


def test_resume_equals_uninterrupted(store, tmp_path, one_thread):
    base = dict(features=store, algo="predictor", population=3, sample=2, cycles=4, parallel=2, cv_folds=2, **TINY)
    full = evolve(EvolveConfig(out=str(tmp_path / "a"), **base))
    half = evolve(EvolveConfig(out=str(tmp_path / "b"), stop_after=4, **base))
    # groups: 2 + 1 (the initial population), then 2 + 2 picked by the predictor: it stops after the group that
    # reaches 4, inside the predictor-guided part
    assert half["candidates"] == 5 and not half["complete"]
    one_line_error(lambda: evolve(EvolveConfig(out=str(tmp_path / "b"), **base)), "--resume")
    one_line_error(lambda: evolve(EvolveConfig(out=str(tmp_path / "b"), resume=True, **dict(base, population=4))),
                   "--population 3, not 4")
    rest = evolve(EvolveConfig(out=str(tmp_path / "b"), resume=True, **base))
    assert rest["complete"] and rest["candidates"] == full["candidates"] == 7
    assert strip(read_history(tmp_path / "a")) == strip(read_history(tmp_path / "b"))
    assert rest["predictor"] == full["predictor"] and rest["genotype"] == full["genotype"]
    assert (tmp_path / "a" / "genotype.json").read_text() == (tmp_path / "b" / "genotype.json").read_text()
    again = evolve(EvolveConfig(out=str(tmp_path / "b"), resume=True, **base))  # finished: nothing to do
    assert strip(read_history(tmp_path / "b")) == strip(read_history(tmp_path / "a")) and again["complete"]
    longer = evolve(EvolveConfig(out=str(tmp_path / "b"), resume=True, **dict(base, cycles=6)))  # extends it
    assert longer["candidates"] == 9 and strip(read_history(tmp_path / "b"))[:7] == strip(read_history(tmp_path / "a"))


def test_darts_space_rea_and_train(store, tmp_path, one_thread):
    s = evolve(EvolveConfig(features=store, out=str(tmp_path / "run"), algo="rea", population=3, sample=2,
                            cycles=3, **dict(TINY, space="darts", layers=3, channels=4)))
    h = read_history(tmp_path / "run")
    assert len(h) == 6 and all(r["origin"] == "mutation" for r in h[3:])
    g = load_genotype(tmp_path / "run" / "genotype.json")
    assert isinstance(g, DartsGenotype) and g.to_json() == s["genotype"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cli("train", "--features", store, "--genotype", tmp_path / "run" / "genotype.json", "--out",
                  tmp_path / "train", "--epochs", 1, "--layers", 3, "--channels", 4, "--batch-size", 64, "--limit",
                  128, "--device", "cpu", "--quiet")
    assert "1/1 epochs" in out


def test_on_the_fly_trains_candidates_on_images_through_the_stem(store, tmp_path, one_thread):
    s = evolve(EvolveConfig(features=store, out=str(tmp_path / "otf"), algo="random", population=2, cycles=0,
                            on_the_fly=True, **TINY))
    h = read_history(tmp_path / "otf")
    assert s["data"]["source"] == "images through the frozen stem" and len(h) == 2
    assert all(math.isfinite(r["val_loss"]) and 0 <= r["val_acc"] <= 100 for r in h)


def test_bad_input_is_one_line(store, tmp_path):
    one_line_error(lambda: resolve_config(EvolveConfig(algo="bohb")), "unknown --algo 'bohb'", "rea")
    one_line_error(lambda: resolve_config(EvolveConfig(space="nb101")), "unknown search space")
    one_line_error(lambda: resolve_config(EvolveConfig(population=4, sample=5)), "--sample 5", "--population 4")
    one_line_error(lambda: resolve_config(EvolveConfig(algo="predictor", population=1, sample=1)), "--population 2")
    one_line_error(lambda: resolve_config(EvolveConfig(train_portion=1.0)), "--train-portion")
    one_line_error(lambda: resolve_config(EvolveConfig(cycles=-1)), "--cycles")
    one_line_error(lambda: resolve_config(EvolveConfig(epochs_per_candidate=0)), "--epochs-per-candidate")
    one_line_error(lambda: resolve_config(EvolveConfig(algo="predictor", parallel=8, pool=4)), "--pool")
    one_line_error(lambda: resolve_config(EvolveConfig(lr=0.0)), "--lr")
    one_line_error(lambda: evolve(EvolveConfig(features=str(tmp_path / "none.zarr"), out=str(tmp_path / "r"),
                                               progress=False)), "no feature store")
    r = ktnas_main(["evolve", "--features", store, "--out", str(tmp_path / "r"), "--sample", "30", "--quiet"])
    assert r == 2 and not (tmp_path / "r").exists()
