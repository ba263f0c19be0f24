"""The docs run: every code block of README.md and docs/ as written, the example scripts with
their documented command lines, and the strict docs build.

A fenced block is marked by an HTML comment on the line before it (blank lines between are
allowed); nothing is skipped unless the Markdown says so:

* a ``python`` block with no marker runs as written, alone, in a fresh folder;
* ``<!-- docs-test: prelude=toy,loader launch=local,torchrun,horovod,elastic -->`` runs it
  after the named preludes (below: the small data, model and files a fragment names) - in one
  process (``local``, the default) and/or as the script of a 2-rank job under each launcher
  named (``elastic``: horovodrun's elastic driver on this machine, with a discovery script;
  ``horovod:slow``: that launch only behind ``@pytest.mark.slow``);
* ``<!-- docs-test: run -->`` (``bash``): the block is a script of example commands, run from a
  fresh folder that holds a link to ``scripts/``;
* ``<!-- docs-test: pip -->`` (``bash``): each ``pip install`` resolves (``--dry-run``, no
  index) from the repository root, with torch pinned;
* ``<!-- docs-test: skip (reason) -->``: not run; the reason is required.

Every ``bash`` block needs a marker. ``slow`` in a marker puts the block behind
``@pytest.mark.slow``. Blocks of other languages (output, YAML manifests) are not code.
"""
from __future__ import annotations

import ast
import dataclasses
import html
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from harness import ROOT, LaunchError, command, run

import horovod_iter

ROLE = re.compile(r":(class|func|meth|mod|attr|exc|data):`")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = [ROOT / "scripts" / "train.py", ROOT / "scripts" / "train_elastic.py"]
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
LAUNCHES = ("local", "torchrun", "horovod", "elastic")
BIN = str(Path(sys.executable).parent)

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")


# --- the small data and names that fragments use ----------------------------------------------

PRELUDES = {
    # a regression set, a model, an optimiser and the loop's names
    "toy": '''
import os
import torch
import horovod_iter as hi
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
_x = torch.randn(300, 8)
train_set = dataset = TensorDataset(_x, _x.sum(1, keepdim=True))
held_out = val_set = TensorDataset(torch.randn(101, 8), torch.randn(101, 1))
model = torch.nn.Linear(8, 1)
opt = optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
loss_fn = torch.nn.functional.mse_loss
start_epoch, epochs = 0, 2
path = os.path.abspath(f"checkpoint-{os.getpid()}.pt")
device = torch.device("cpu")
my_dataloader = DataLoader(train_set, batch_size=32)
lengths = [int(n) for n in torch.randint(1, 50, (len(train_set),))]
pad_collate = None

def read_records(path):
    yield from (torch.tensor([float(i)]) for i in range(100))

def train_step(x, y):
    opt.zero_grad()
    loss = loss_fn(model(x), y, reduction="sum") / max(1, len(x))  # empty batches: 0
    loss.backward()
    opt.step()
''',
    "loader": '''
loader = hi.DistributedLoader(train_set, batch_size=32, seed=0)
''',
    # Horovod initialised, its DistributedOptimizer (under horovodrun)
    "elastic": '''
import horovod.torch as hvd

hvd.init()
opt = optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                           named_parameters=model.named_parameters())
''',
    # one process of Accelerate, a classifier and an evaluation set of dicts
    "accelerate": '''
import accelerate

accelerator = accelerate.Accelerator(cpu=True)
folder = os.path.abspath("accelerate-state")
model = torch.nn.Linear(8, 3)
opt = optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
val_set = [{"input": torch.randn(8), "labels": torch.tensor(k % 3)} for k in range(101)]
''',
    # shard files in the current folder, in every format the streaming page reads
    "files": '''
import json as _json
import tarfile as _tarfile
import io as _io

epochs = start_epoch + 1   # one epoch: the mixing example's is a million samples
for _i in range(8):
    with open(f"train-{_i:02d}.jsonl", "w") as _f:
        for _k in range(20):
            _f.write(_json.dumps({"x": _i * 20 + _k}) + "\\n")
my_collate = list

def read(path, start=0):
    with open(path) as f:
        for k, line in enumerate(f):
            if k >= start:
                yield int(line)

def _text_shards(prefix, n, size):
    names = []
    for i in range(n):
        names.append(os.path.abspath(f"{prefix}-{i:02d}.txt"))
        with open(names[-1], "w") as f:
            f.writelines(f"{i * size + k}\\n" for k in range(size))
    return names, [size] * n

shards, sizes = _text_shards("shard", 24, 10)
web_shards, web_sizes = _text_shards("web", 16, 40)
code_shards, code_sizes = _text_shards("code", 8, 40)
web, code, books = list(range(3000)), list(range(1000)), list(range(300))

for _i in range(4):
    with _tarfile.open(f"train-{_i:02d}.tar", "w") as _t:
        for _k in range(5):
            for _ext, _data in (("jpg", b"\\xff\\xd8 not an image"), ("cls", b"7")):
                _info = _tarfile.TarInfo(f"{_i * 5 + _k:06d}.{_ext}")
                _info.size = len(_data)
                _t.addfile(_info, _io.BytesIO(_data))

import pyarrow as _pa
import pyarrow.parquet as _pq

files = []
for _i in range(2):
    files.append(f"part-{_i}.parquet")
    _pq.write_table(_pa.table({"x": list(range(_i * 40, _i * 40 + 40))}), files[-1],
                    row_group_size=10)
''',
}


# --- the blocks ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block and the marker before it."""

    file: str
    line: int
    lang: str
    code: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def kind(self) -> str:
        if self.lang in PYTHON_LANGS:
            return "python"
        return "shell" if self.lang in SHELL_LANGS else "text"


@dataclasses.dataclass(frozen=True)
class Marker:
    skip: str | None = None
    run: bool = False
    pip: bool = False
    slow: bool = False
    preludes: tuple[str, ...] = ()
    launches: tuple[str, ...] = ("local",)
    slow_launches: tuple[str, ...] = ()


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, dedented, with the marker comment before it."""
    lines = path.read_text().splitlines()
    rel = str(path.relative_to(ROOT))
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent = len(m.group("indent"))
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = MARK.match(lines[k]) if k >= 0 else None
        blocks.append(Block(rel, start + 1, m.group("lang").lower(), "\n".join(body) + "\n",
                            mark.group("body") if mark else None))
    return blocks


def parse_marker(block: Block) -> Marker:
    """The marker's meaning; a malformed one is an error naming the block."""
    body = (block.marker or "").strip()
    skip = re.fullmatch(r"skip\s*\((?P<why>.+)\)", body)
    if skip:
        return Marker(skip=skip.group("why").strip())
    words = body.split()
    slow = "slow" in words
    words = [w for w in words if w != "slow"]
    if block.kind == "shell":
        if words == ["run"]:
            return Marker(run=True, slow=slow)
        if words == ["pip"]:
            return Marker(pip=True, slow=slow)
        raise ValueError(f"{block.id}: a bash block needs <!-- docs-test: run -->, "
                         f"<!-- docs-test: pip --> or <!-- docs-test: skip (reason) -->; "
                         f"got {block.marker!r}")
    fields: dict[str, tuple[str, ...]] = {}
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or key not in ("prelude", "launch"):
            raise ValueError(f"{block.id}: unknown docs-test marker word {w!r} (prelude=..., "
                             "launch=..., slow, or skip (reason))")
        fields[key] = tuple(v for v in value.split(",") if v)
    preludes = fields.get("prelude", ())
    named = fields.get("launch", ("local",))
    launches = tuple(x.removesuffix(":slow") for x in named)
    bad = [p for p in preludes if p not in PRELUDES] + [x for x in launches if x not in LAUNCHES]
    if bad:
        raise ValueError(f"{block.id}: unknown prelude or launch {bad}; preludes "
                         f"{sorted(PRELUDES)}, launches {LAUNCHES} (NAME:slow: behind -m slow)")
    slow_launches = tuple(x.removesuffix(":slow") for x in named if x.endswith(":slow"))
    return Marker(slow=slow, preludes=preludes, launches=launches, slow_launches=slow_launches)


ALL_BLOCKS = [b for doc in DOCS for b in parse_blocks(doc) if b.kind != "text"]


def _marker(block: Block) -> Marker:
    try:
        return parse_marker(block)
    except ValueError:
        return Marker(skip="malformed marker (test_every_code_block_is_run_or_marked fails)")


def _source(block: Block) -> str:
    """The script run for a python block: its preludes, then the block as written."""
    parts = [f"# prelude {p}\n{PRELUDES[p]}" for p in _marker(block).preludes]
    return "".join(parts) + f"# {block.id}\n{block.code}"


def _param(block: Block, *extra: str) -> object:
    m = _marker(block)
    marks = [pytest.mark.slow] if m.slow or any(x in m.slow_launches for x in extra) else []
    return pytest.param(block, *extra, id="-".join([block.id, *extra]), marks=marks)


PY_LOCAL = [_param(b) for b in ALL_BLOCKS if b.kind == "python" and not _marker(b).skip
            and "local" in _marker(b).launches]
PY_LAUNCHED = [_param(b, launcher) for b in ALL_BLOCKS
               if b.kind == "python" and not _marker(b).skip
               for launcher in _marker(b).launches if launcher != "local"]
SHELL_RUN = [_param(b) for b in ALL_BLOCKS if b.kind == "shell" and _marker(b).run]
SHELL_PIP = [_param(b) for b in ALL_BLOCKS if b.kind == "shell" and _marker(b).pip]


def test_every_code_block_is_run_or_marked():
    """Nothing is skipped in silence: every marker parses, every bash block has one, and a
    skip names its reason. The list of what runs is printed (``-s``)."""
    errors, plan = [], []
    for b in ALL_BLOCKS:
        try:
            m = parse_marker(b)
        except ValueError as e:
            errors.append(str(e))
            continue
        if m.skip:
            plan.append(f"{b.id} {b.lang}: skipped ({m.skip})")
        elif b.kind == "python":
            plan.append(f"{b.id} python: preludes {list(m.preludes)}, {', '.join(m.launches)}")
        else:
            plan.append(f"{b.id} bash: {'commands run' if m.run else 'pip resolves'}")
    print("\n".join(plan))
    assert not errors, "\n".join(errors)
    assert PY_LOCAL and PY_LAUNCHED and SHELL_RUN and SHELL_PIP


# --- python blocks in one process ---------------------------------------------------------------

@pytest.fixture(scope="module")
def local_results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Block], str]:
    """A block's result; the first request runs every local python block of its group (fast
    or slow) in one process (tests/docs_runner.py)."""
    done: dict[bool, dict[str, str]] = {}

    def result(block: Block) -> str:
        slow = _marker(block).slow
        if slow not in done:
            folder = tmp_path_factory.mktemp("docs-local")
            blocks = [{"id": b.id, "source": _source(b)}
                      for b in (p.values[0] for p in PY_LOCAL) if _marker(b).slow == slow]
            (folder / "blocks.json").write_text(json.dumps(blocks))
            res = run([sys.executable, str(ROOT / "tests" / "docs_runner.py"),
                       str(folder / "blocks.json"), str(folder / "results.json"),
                       "500" if slow else "120"], timeout=800,
                      env={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, cwd=folder)
            done[slow] = (json.loads((folder / "results.json").read_text())
                          if (folder / "results.json").exists() else {})
            if res.returncode != 0:
                done[slow]["__runner__"] = res.stdout[-8000:]
        return done[slow].get(block.id, done[slow].get("__runner__", "did not run"))

    return result


@pytest.mark.parametrize("block", PY_LOCAL)
def test_python_block_runs(block: Block, local_results: Callable[[Block], str]):
    result = local_results(block)
    assert result == "ok", f"{block.id} does not run as written:\n{result}"


# --- python blocks as the script of a 2-rank job ------------------------------------------------

def _discovery_script(folder: Path) -> Path:
    script = folder / "discover_hosts.sh"
    script.write_text("#!/bin/sh\necho localhost:2\n")
    script.chmod(0o755)
    return script


@pytest.mark.distributed
@pytest.mark.parametrize(("block", "launcher"), PY_LAUNCHED)
def test_python_block_runs_on_two_ranks(block: Block, launcher: str, tmp_path: Path):
    script = tmp_path / "block.py"
    script.write_text(_source(block))
    if launcher == "elastic":  # the one-machine recipe of docs/launching.md
        cmd = [f"{BIN}/horovodrun", "-np", "2", "--min-np", "1", "--max-np", "2",
               "--network-interface", "lo", "--host-discovery-script",
               str(_discovery_script(tmp_path)), sys.executable, str(script)]
    else:
        cmd = command({"torchrun": "torch", "horovod": "horovod"}[launcher], 2, [str(script)])
    res = run(cmd, timeout=180, cwd=tmp_path)
    assert res.returncode == 0, f"{block.id} fails under {launcher}:\n{res.stdout[-8000:]}"


# --- example commands ---------------------------------------------------------------------------

def _script_commands(path: Path) -> list[str]:
    """The command lines in a script's docstring (indented lines that start with a command;
    backslash continuations joined), as one shell script per group of consecutive lines."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    groups: list[list[str]] = [[]]
    lines = doc.splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.startswith("    ") and line.split()[0] in ("horovodrun", "torchrun", "python",
                                                           "printf", "bash"):
            cmd = line.strip()
            while cmd.endswith("\\") and k + 1 < len(lines):
                k += 1
                cmd = cmd[:-1] + " " + lines[k].strip()
            groups[-1].append(cmd)
        elif groups[-1]:
            groups.append([])
        k += 1
    return ["\n".join(g) + "\n" for g in groups if g]


SCRIPT_RUN = [pytest.param(path, code, id=f"{path.relative_to(ROOT)}-{k}",
                           marks=[pytest.mark.slow])  # the pages' blocks run the same
              for path in SCRIPTS for k, code in enumerate(_script_commands(path))]


def _run_commands(code: str, folder: Path, what: str) -> None:
    """Runs example commands from a fresh folder that links to scripts/ (paths as written)."""
    (folder / "scripts").symlink_to(ROOT / "scripts")
    (folder / "commands.sh").write_text(code)
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable}
    try:
        res = run(["bash", "-e", "-o", "pipefail", "commands.sh"], timeout=300, env=env,
                  cwd=folder)
    except LaunchError as e:
        pytest.fail(f"{what} timed out:\n{code}\n{e}")
    assert res.returncode == 0, f"{what} fails:\n{code}\n{res.stdout[-8000:]}"


@pytest.mark.distributed
@pytest.mark.parametrize("block", SHELL_RUN)
def test_documented_commands_run(block: Block, tmp_path: Path):
    _run_commands(block.code, tmp_path, block.id)


@pytest.mark.distributed
@pytest.mark.parametrize(("path", "code"), SCRIPT_RUN)
def test_example_script_docstring_commands_run(path: Path, code: str, tmp_path: Path):
    _run_commands(code, tmp_path, f"{path.relative_to(ROOT)}'s docstring")


def test_script_docstrings_document_commands():
    """Both examples document how to launch them (what the test above runs)."""
    assert {p.name for p, _ in (x.values for x in SCRIPT_RUN)} == {p.name for p in SCRIPTS}


@pytest.mark.parametrize("block", SHELL_PIP)
def test_install_commands_resolve(block: Block):
    """The install command, from the repository root, resolves against what is installed
    (dry run, no index): the package path exists and torch is pinned."""
    cmds = [shlex.split(ln.split("#")[0]) for ln in block.code.splitlines() if ln.strip()]
    assert cmds
    for argv in cmds:
        assert argv[:2] == ["pip", "install"], f"{block.id}: not a pip install: {argv}"
        torch_reqs = [a for a in argv[2:] if re.match(r"torch\b", a)]
        assert torch_reqs and all("==" in r for r in torch_reqs), (
            f"{block.id}: pin torch (torch==X.Y.Z), else pip may pick another torch build: {argv}")
        res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                              "--no-build-isolation", "--disable-pip-version-check", *argv[2:]],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "horovod_iter" in res.stdout, (
            f"{block.id}: `{' '.join(argv)}` fails from the repository root:\n"
            f"{res.stdout[-3000:]}{res.stderr[-3000:]}")


# --- the site -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built strictly (any warning fails, as in scripts/test.sh)."""
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"mkdocs build --strict fails:\n{res.stderr[-6000:]}"
    return out


def test_docs_build_strictly_and_render_no_raw_markup(site: Path):
    raw = [str(p.relative_to(site)) for p in site.rglob("*.html")
           if ROLE.search(p.read_text()) or "&gt;&gt;&gt; " in p.read_text()]
    assert not raw, f"raw Sphinx roles or doctest prompts in {raw}: use backticks, fenced blocks"
    fences = [str(p.relative_to(site)) for p in site.rglob("*.html") if "```" in p.read_text()]
    assert not fences, \
        f"code blocks rendered as text (a fence the Markdown did not take) in {fences}"


def test_every_public_name_has_an_api_entry():
    api = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in horovod_iter.__all__ if f"::: horovod_iter.{n}\n" not in api]
    assert not missing, f"docs/api.md lacks `::: horovod_iter.NAME` for {missing}"


def test_distributed_loader_reference_lists_every_parameter(site: Path):
    """Grouped docstring entries ("a, b: ...") render one row each (the griffe extension)."""
    page = (site / "api" / "index.html").read_text()
    start = page.index('id="horovod_iter.DistributedLoader"')
    table = page[start:page.index("</table>", start)]
    rows = set(re.findall(r"<code>(\w+)</code>\s*</td>", html.unescape(table)))
    params = [p for p in inspect.signature(horovod_iter.DistributedLoader).parameters
              if p != "self"]
    missing = [p for p in params if p not in rows]
    assert not missing, f"the API reference's DistributedLoader table lacks {missing}"


def test_grouped_parameters_are_split():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from mkdocs_grouped_params import expand_grouped_params
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    doc = ("Do it.\n\nArgs:\n    a, b,\n        c: shared\n        more.\n    d (int): own.\n"
           "\nReturns:\n    x, y: not parameters.\n")
    assert expand_grouped_params(doc) == (
        "Do it.\n\nArgs:\n    a: shared\n        more.\n    b: shared\n        more.\n"
        "    c: shared\n        more.\n    d (int): own.\n\nReturns:\n    x, y: not parameters.\n")


def test_no_sphinx_roles_in_docstrings():
    root = Path(horovod_iter.__file__).parent
    bad = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py")
           for n, line in enumerate(p.read_text().splitlines(), 1) if ROLE.search(line)]
    assert not bad, f"Sphinx roles render raw on the docs site; use backticks: {bad}"
