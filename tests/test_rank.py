"""ktnas rank: zero-cost proxy scores of architectures on cached features (or images), deterministic for a seed,
resumed == uninterrupted, genotypes read in the field's forms, bad input refused in one line."""
import json

import pytest

from conftest import one_line_error

from ktnas.engine.rank import run as rank_run
from ktnas.engine.rank.run import rank
from ktnas.engine.spaces import distinct_genotypes, genotype_str, get_space

QUICK = dict(batches=2, batch_size=8, layers=2, channels=4, progress=False)


def scores(rows):
    return [(r["arch"], r["scores"]) for r in rows]


def test_deterministic_and_resumed_equals_uninterrupted(search_store, tmp_path, monkeypatch):
    a = rank(features=search_store, out=str(tmp_path / "a"), sample=4, **QUICK)
    b = rank(features=search_store, out=str(tmp_path / "b"), sample=4, **QUICK)
    assert scores(a["rows"]) == scores(b["rows"]) and len(a["rows"]) == 4
    assert [r["arch"] for r in a["rows"]] == [genotype_str(g) for g in distinct_genotypes("nb201", 4, 0)]
    assert set(a["rows"][0]["scores"]) == set(rank_run.DEFAULT_PROXIES.split(","))
    real = rank_run.score_architecture

    def stop_at_2(genotype, index, *args):
        if index == 2:
            raise KeyboardInterrupt
        return real(genotype, index, *args)

    monkeypatch.setattr(rank_run, "score_architecture", stop_at_2)
    with pytest.raises(KeyboardInterrupt):
        rank(features=search_store, out=str(tmp_path / "c"), sample=4, **QUICK)
    monkeypatch.setattr(rank_run, "score_architecture", real)
    one_line_error(lambda: rank(features=search_store, out=str(tmp_path / "c"), sample=4, **QUICK),
                   "already holds scores: pass --resume")
    one_line_error(lambda: rank(features=search_store, out=str(tmp_path / "c"), sample=4, resume=True,
                                **dict(QUICK, batch_size=4)), "other settings (batch_size)")
    c = rank(features=search_store, out=str(tmp_path / "c"), sample=4, resume=True, **QUICK)
    assert scores(c["rows"]) == scores(a["rows"])
    csv = (tmp_path / "c" / "scores.csv").read_text().splitlines()
    assert len(csv) == 5 and csv[0].startswith("index,arch,synflow,")


def test_genotype_files_in_the_fields_forms(search_store, tmp_path):
    """A JSON list, JSON lines of evolve's candidate rows and NB201 strings, one per line, name the same
    architectures and get the same scores."""
    gs = distinct_genotypes("nb201", 3, 5)
    (tmp_path / "list.json").write_text(json.dumps([g.to_json() for g in gs]))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(dict(index=i, genotype=g.to_json()))
                                                   for i, g in enumerate(gs)))
    (tmp_path / "archs.txt").write_text("# NB201 strings\n" + "\n".join(genotype_str(g) for g in gs) + "\n")
    kw = dict(QUICK, proxy="snip,naswot,params")
    runs = [rank(features=search_store, out=str(tmp_path / f"r{k}"), genotypes=str(tmp_path / name), **kw)
            for k, name in enumerate(("list.json", "rows.jsonl", "archs.txt"))]
    assert scores(runs[0]["rows"]) == scores(runs[1]["rows"]) == scores(runs[2]["rows"])
    assert [r["arch"] for r in runs[0]["rows"]] == [genotype_str(g) for g in gs]
    darts = get_space("darts").random_genotype(__import__("numpy").random.default_rng(0))
    (tmp_path / "darts.json").write_text(json.dumps([darts.to_json()]))
    one_line_error(lambda: rank(features=search_store, out=str(tmp_path / "x"), genotypes=str(tmp_path / "darts.json"),
                                **kw), "entry 1 is a darts genotype, not nb201: pass --space darts")


def test_classic_network_on_images(search_store, tmp_path):
    """--stem none scores the whole network with its own conv stem on the store's images."""
    r = rank(features=search_store, out=str(tmp_path / "n"), sample=2, stem="none", proxy="snip,params",
             **QUICK)
    assert r["network"]["in_channels"] is None and len(r["rows"]) == 2
    f = rank(features=search_store, out=str(tmp_path / "f"), sample=2, proxy="snip,params", **QUICK)
    assert [x["scores"]["params"] for x in r["rows"]] != [x["scores"]["params"] for x in f["rows"]]


def test_refusals(search_store, tmp_path):
    out = str(tmp_path / "x")
    one_line_error(lambda: rank(features=search_store, out=out, sample=2, proxy="synflow,magic", **QUICK),
                   "unknown magic")
    one_line_error(lambda: rank(features=search_store, out=out, sample=2, proxy="zico", **dict(QUICK, batches=1)),
                   "pass --batches 2 or more")
    one_line_error(lambda: rank(features=search_store, out=out, **QUICK), "pass --genotypes FILE or --sample N")
    one_line_error(lambda: rank(features=search_store, out=out, genotypes=str(tmp_path / "none.json"), **QUICK),
                   "no such file")


def test_evolve_screens_its_initial_population_by_a_proxy(search_store, tmp_path):
    """ktnas evolve --proxy params --proxy-pool 6: the initial population is the 3 architectures of the drawn pool
    whose candidate networks have the most weights, best first; a resumed run trains the same candidates."""
    import numpy as np

    from ktnas.engine.evolve import evolve
    from ktnas.engine.evolve.screen import proxy_pool
    from ktnas.engine.train.network import build_network

    kw = dict(features=search_store, space="nb201", algo="rea", population=3, sample=2, cycles=2, limit=48,
              batch_size=8, layers=2, channels=4, epochs_per_candidate=1, device="cpu", progress=False,
              proxy="params", proxy_pool=6)
    s = evolve(out=str(tmp_path / "e"), **kw)
    rows = [json.loads(line) for line in (tmp_path / "e" / "candidates.jsonl").read_text().splitlines()]
    build = json.loads((tmp_path / "e" / "config.json").read_text())["network_config"]
    pool = proxy_pool("nb201", 6, 0)
    params = [sum(p.numel() for p in build_network(g, **build).parameters()) for g in pool]
    top = np.argsort(-np.array(params), kind="stable")[:3]
    assert [r["genotype"] for r in rows[:3]] == [pool[i].to_json() for i in top]
    assert [r["origin"] for r in rows] == ["proxy"] * 3 + ["mutation"] * 2
    assert [r["proxy_score"] for r in rows[:3]] == [params[i] for i in top]
    assert s["screening"]["proxy"] == "params" and s["screening"]["pool"] == 6
    evolve(out=str(tmp_path / "r"), stop_after=2, **kw)
    evolve(out=str(tmp_path / "r"), resume=True, **kw)
    again = [json.loads(line) for line in (tmp_path / "r" / "candidates.jsonl").read_text().splitlines()]
    assert [(r["genotype"], r["val_acc"]) for r in again] == [(r["genotype"], r["val_acc"]) for r in rows]
    one_line_error(lambda: evolve(out=str(tmp_path / "x"), **dict(kw, proxy_pool=2)), "--proxy-pool 2 is smaller")
    one_line_error(lambda: evolve(out=str(tmp_path / "x"), **dict(kw, proxy="naswot,snip")), "name one proxy")
