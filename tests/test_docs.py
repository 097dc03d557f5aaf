"""The documentation stays true because it is built and run.

- The site builds with ``mkdocs build --strict``: no broken link or anchor, every API page found.
- Every shell example (a ``bash``/``sh``/``shell``/``console`` block) in README.md and docs/ is either run here or
  marked ``<!-- not run: REASON -->`` on the line before it. The run examples run as written, in order, page by
  page, in one folder that holds what they name (Fashion-MNIST through the ImageNet MobileNetV2 stem, an image
  folder ``my-images/`` of real Fashion-MNIST PNG files, ``photo.png``); only their size is the test's: the
  flags in ``SMALL`` are appended (argparse keeps the last), so a search runs one epoch on a few dozen samples.
- README.md stays a newcomer's page (at most 250 lines), and no document speaks of how ktnas is developed.
"""
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"
SHELL = ("bash", "sh", "shell", "console")
MARK = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
# per command: the flags appended to make it small (only where the example does not fix the layout itself)
SMALL = {
    "precompute-features": ["--limit", "48", "--quiet"],
    "search": ["--epochs", "1", "--limit", "48", "--batch-size", "8", "--device", "cpu", "--quiet"],
    "train": ["--epochs", "1", "--limit", "48", "--batch-size", "8", "--device", "cpu", "--quiet"],
    "evaluate": ["--limit", "24", "--device", "cpu", "--quiet"],
    "evolve": ["--population", "2", "--sample", "2", "--cycles", "1", "--limit", "48", "--batch-size", "8",
               "--device", "cpu", "--quiet"],
    "rank": ["--sample", "3", "--batch-size", "8", "--quiet"],
}
LAYOUT = {"search": ["--layers", "2", "--channels", "8"], "train": ["--layers", "2", "--channels", "8"],
          "evolve": ["--layers", "1", "--channels", "8"], "rank": ["--layers", "2", "--channels", "4"]}
# how ktnas is developed is no user's business: none of it in the documents
DEVELOPMENT = re.compile(r"\bissue #?\d{1,3}\b(?![.,]\d)|\bissue numbers?\b|\bsessions?\b|(?-i:DESIGN\.md)|"
                         r"\.\./shared|\bcarry\b|\.gpu/|prepare\.sh|CI-class|\bin CI\b|what CI runs|project's CI|"
                         r"\$OUT\b|device time", re.I)


def documents():
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def shell_blocks(path: Path):
    """(line, body, reason) of every shell block of a markdown file; reason None when it is to be run."""
    lines, blocks, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```+\s*(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        j = next(k for k in range(i + 1, len(lines)) if lines[k].strip().startswith("```"))
        if fence.group(2) in SHELL:
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            mark = MARK.search(prev)
            blocks.append((i + 1, "\n".join(lines[i + 1:j]), mark.group(1) if mark else None))
        i = j + 1
    return blocks


def commands(body: str):
    """The argv of every ``ktnas`` command of a block (``VAR=value`` lines and prefixes, ``$VAR`` applied);
    ValueError for anything else, which the example's page must then mark as not run."""
    env, out = {}, []
    for line in body.replace("\\\n", " ").splitlines():
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), line)
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        if not words:
            continue
        if words[0] != "ktnas" or any("$" in w for w in words):
            raise ValueError(f"not a ktnas command: {line.strip()}")
        out.append(words[1:])
    return out


def test_every_shell_example_is_run_or_says_why():
    problems = []
    for path in documents():
        for line, body, reason in shell_blocks(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if reason is not None:
                if len(reason) < 10:
                    problems.append(f"{where}: 'not run' needs a reason")
                continue
            try:
                if not commands(body):
                    problems.append(f"{where}: an empty example")
            except ValueError as e:
                problems.append(f"{where}: {e} (run it through ktnas, or mark it <!-- not run: why -->)")
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_no_document_speaks_of_development():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in documents()
             for n, line in enumerate(p.read_text().splitlines(), 1) if DEVELOPMENT.search(line)]
    assert not found, "\n".join(found)


def test_readme_links_resolve():
    """README's links (read on GitHub and PyPI, outside the site's strict build): every file exists, every anchor of
    its own is a heading of it."""
    text = (ROOT / "README.md").read_text()
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.*)$", text, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (ROOT / path).exists(), target
        else:
            assert anchor in slugs, target


def test_the_checks_catch_what_they_should(tmp_path):
    """The harness fails what it must: an unmarked non-ktnas example, a bare mark, a development remark."""
    page = tmp_path / "p.md"
    page.write_text("```bash\npip install x\n```\n\n<!-- not run: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n"
                    "```bash\nS=a.zarr\nOMP_NUM_THREADS=1 ktnas inspect $S \\\n  --json  # c\n```\n")
    (a, body_a, r_a), (_, _, r_b), (_, body_c, r_c) = shell_blocks(page)
    assert (a, r_a, r_b, r_c) == (1, None, "needs a GPU", None)
    with pytest.raises(ValueError):
        commands(body_a)
    assert commands(body_c) == [["inspect", "a.zarr", "--json"]]
    assert DEVELOPMENT.search("as issue 24 asked") and DEVELOPMENT.search("this session")
    assert DEVELOPMENT.search("see DESIGN.md") and DEVELOPMENT.search("on the CI-class machine")
    for fine in ("tau 95% CI", "ort_session.run", "issues 12,016 launches", "issues 0.54x", "[Design](design.md)"):
        assert not DEVELOPMENT.search(fine), fine


def test_docs_build_strictly(tmp_path):
    """mkdocs build --strict: a broken link, anchor or API reference fails (the site is what `mkdocs serve` shows)."""
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    for page in ("index.html", "getting-started/index.html", "reference/cli/index.html",
                 "reference/api/index.html", "changelog/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "reference/api/index.html").read_text()
    assert "SearchConfig" in api and "mixed_op" in api  # mkdocstrings read the docstrings
    assert "Changelog" in (tmp_path / "site" / "changelog/index.html").read_text()


# ---------------------------------------------------------------------------------------------------- running them
def _small(argv):
    cmd = argv[0]
    extra = list(SMALL.get(cmd, ()))
    if cmd in LAYOUT and not {"--layers", "--reductions", "--channels"} & set(argv):
        extra += LAYOUT[cmd]
    return argv + extra


def _run(argv, cwd):
    from ktnas.engine.cli import main

    here = os.getcwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main([str(a) for a in _small(argv)])
    finally:
        os.chdir(here)
    assert rc == 0, f"ktnas {shlex.join(argv)} exited with {rc}"


def _pngs(folder: Path, split, indices, names):
    from PIL import Image

    for i in indices:
        label = int(split.labels[i])
        if label < len(names):
            d = folder / names[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(split.get_batch([i])[0, 0].numpy()).save(d / f"{i:05d}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real Fashion-MNIST images as class folders and single PNG files, and the demo's store and model (built by
    the Getting started page's own commands), for every page's examples."""
    if not os.path.isdir(FMNIST):
        pytest.skip("dataset-fashion-mnist not installed (make setup installs it)")
    from ktnas.cache.datasets import load_split

    d = tmp_path_factory.mktemp("docs")
    train, test = load_split("fashion-mnist", "train"), load_split("fashion-mnist", "test")
    names = ["T-shirt_top", "Trouser", "Pullover"]
    _pngs(d / "my-images" / "train", train, range(120), names)
    _pngs(d / "my-images" / "test", test, range(40), names)
    (d / "my_photos").mkdir()
    (d / "my_photos" / "test").symlink_to(d / "my-images" / "test")
    _pngs(d / "more_photos", test, range(40, 50), [""] * 10)  # any class, straight in the folder
    next((d / "more_photos").glob("*.png")).rename(d / "photo.png")
    return d


def _workdir(world: Path, page: str) -> Path:
    """A page's own folder: the images linked in, and the demo's runs where the Getting started page made them."""
    w = world / re.sub(r"\W", "-", page)
    w.mkdir()
    for name in ("my-images", "my_photos", "more_photos", "photo.png"):
        (w / name).symlink_to(world / name)
    demo = world / re.sub(r"\W", "-", "docs/getting-started.md") / "runs"
    if demo.is_dir() and not page.endswith("getting-started.md"):
        (w / "runs").mkdir()
        for name in ("fashion-mnist_mobilenet_v2-features.3_64.zarr", "demo"):
            (w / "runs" / name).symlink_to(demo / name)
    return w


def _run_page(page: str, world: Path) -> tuple[Path, int]:
    w, ran = _workdir(world, page), 0
    for _, body, reason in shell_blocks(ROOT / page):
        if reason is None:
            for argv in commands(body):
                _run(argv, w)
                ran += 1
    return w, ran


def _runnable(page: Path) -> bool:
    return any(reason is None for _, _, reason in shell_blocks(page))


GUIDES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")
                if p.name != "getting-started.md" and _runnable(p))


def test_getting_started_runs(world, capsys):
    """The demo's commands and the quick start on one's own images, as the Getting started page writes them."""
    w, ran = _run_page("docs/getting-started.md", world)
    assert ran >= 11
    runs = w / "runs"
    assert (runs / "demo" / "train" / "model.pt").is_file() and (runs / "my-model.onnx").stat().st_size > 0
    assert (runs / "my-eval" / "evaluation.json").is_file() and (runs / "my-search" / "genotype.json").is_file()
    out = capsys.readouterr().out
    assert all(name in out for name in ("T-shirt_top", "Trouser", "Pullover"))  # the folders' classes travelled


def test_the_demo_page_shows_the_makefiles_commands():
    """Getting started's demo block is what `make demo` runs (the Makefile's ktnas commands, its store filled in)."""
    make = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    store = re.search(r"^STORE\s*\?=\s*(\S+)", make, re.M).group(1)
    demo = make[make.index("\ndemo:"):make.index("\ntest:")]
    ran = [shlex.split(line.split("/ktnas ", 1)[1].replace("$(STORE)", store))
           for line in demo.splitlines() if "/ktnas " in line]
    page = [argv for _, body, reason in shell_blocks(ROOT / "docs/getting-started.md") if reason is None
            for argv in commands(body)]
    assert ran and page[:len(ran)] == ran


def test_readme_runs(world):
    """README's quick start, as the README writes it."""
    w, ran = _run_page("README.md", world)
    assert ran >= 5 and (w / "runs" / "my-train" / "model.pt").is_file()


@pytest.mark.parametrize("page", GUIDES)
def test_guide_examples_run(world, page):
    """Every other page's examples, after the Getting started page (whose demo store and model they use)."""
    if not (world / "docs-getting-started-md").is_dir():
        _run_page("docs/getting-started.md", world)
    assert _run_page(page, world)[1] >= 1
