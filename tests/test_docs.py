"""docs/ against the code: every file, command, make target, stage, parameter key, Python name and
anchor the pages mention must exist, so a rename in the code cannot leave the docs stale unnoticed."""

from __future__ import annotations

import dataclasses
import importlib
import re
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
# Where the project cites docs/ pages: code, tests (this file aside: it names pages to check them),
# configuration and the README.
CITING = [
    *sorted((REPO / "sdn").rglob("*.py")),
    *sorted((REPO / "stages").glob("*.py")),
    *sorted(p for p in (REPO / "tests").glob("*.py") if p != Path(__file__).resolve()),
    REPO / "params.yaml",
    REPO / "README.md",
]


def page_ids() -> list[str]:
    return [page.name for page in PAGES]


def mentions(pattern: str) -> list[tuple[str, str]]:
    """(page, match) for every match of `pattern` (its first group if it has one) in docs/*.md."""
    found = []
    for page in PAGES:
        for match in re.finditer(pattern, page.read_text()):
            found.append((page.name, match.group(1) if match.groups() else match.group(0)))
    return found


def test_the_three_pages_exist():
    assert {"maths.md", "modules.md", "pipeline.md"} <= set(page_ids())


def test_every_file_path_exists():
    paths = mentions(r"(?<![\w/.])((?:sdn|stages|tests|benchmarks)/[\w/]*\w\.py)\b")
    assert len(paths) > 30, "the pages should name the modules they describe"
    missing = sorted({f"{page}: {path}" for page, path in paths if not (REPO / path).is_file()})
    assert not missing, f"docs name files that do not exist: {missing}"


def test_every_library_module_is_on_the_map():
    listed = (DOCS / "modules.md").read_text()
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "sdn").rglob("*.py"))
    unlisted = [module for module in modules if f"`{module}`" not in listed]
    assert not unlisted, f"docs/modules.md's map lacks {unlisted}: add a line for each"


@cache
def cli_exit_code(*argv: str) -> int:
    from sdn.__main__ import main

    try:
        main([*argv, "--help"])
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def test_the_command_check_tells_a_bad_command_from_a_good_one(capsys):
    assert cli_exit_code("info") == 0
    assert cli_exit_code("no-such-command") == 2
    assert cli_exit_code("pipeline", "no-such-action") == 2
    capsys.readouterr()


def test_every_python_m_sdn_command_exists(capsys):
    commands = mentions(r"python -m sdn ([a-z]+(?: [a-z|]+)?)")
    assert len(commands) >= 5
    bad = []
    for page, command in commands:
        name, *actions = command.split()
        if cli_exit_code(name) != 0:
            bad.append(f"{page}: python -m sdn {name}")
        elif name == "pipeline":
            for action in (actions[0].split("|") if actions else []):
                if cli_exit_code(name, action) != 0:
                    bad.append(f"{page}: python -m sdn pipeline {action}")
    capsys.readouterr()
    assert not bad, f"docs name commands that `python -m sdn` does not have: {bad}"


def make_targets() -> set[str]:
    """The Makefile's targets, with `$(VARIABLE)` lists (the datasets) expanded."""
    text = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+)\s*:?=\s*(.*)$", text, re.M))

    def expand(value: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: expand(variables.get(m.group(1), "")), value)

    targets: set[str] = set()
    for names in re.findall(r"^([^\s#.][^:=\n]*?)\s*:(?!=)", text, re.M):
        targets.update(expand(names).split())
    return targets


def test_make_target_parsing_sees_the_dataset_targets():
    targets = make_targets()
    assert {"all", "test", "cifar10", "sprites", "celebahq256-release"} <= targets
    assert "no-such-target" not in targets


def test_every_make_target_exists():
    targets = make_targets()
    used = []
    for page, command in mentions(r"`make((?: [^`]*)?)`"):
        words = [w for w in command.split() if "=" not in w and not w.startswith("<")]
        used += [(page, word) for word in words] or [(page, "all")]
    assert len(used) >= 10
    missing = sorted({f"{page}: make {target}" for page, target in used if target not in targets})
    assert not missing, f"docs name make targets the Makefile lacks: {missing}"


def test_every_stage_name_exists():
    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    named = mentions(r"`(\w+)@")
    assert named
    missing = sorted({f"{page}: {stage}@" for page, stage in named if stage not in stages})
    assert not missing, f"docs name DVC stages that dvc.yaml lacks: {missing}"


def section_fields() -> dict[str, set[str]]:
    from sdn import config
    from sdn.hyperparameters import DensityConfig, DisentanglementConfig

    def names(*classes: type) -> set[str]:
        return {f.name for cls in classes for f in dataclasses.fields(cls)}

    return {
        "trainer": names(config.TrainerConfig),
        "train": names(config.TrainConfig),
        "evaluate": names(config.EvaluateConfig),
        "sample": names(config.SampleConfig),
        "release": names(config.ReleaseConfig),
        "model": names(DensityConfig, DisentanglementConfig) | {"kind"},
    }


def test_every_parameter_key_exists():
    fields = section_fields()
    keys = mentions(r"`(?:experiments\.[\w<>.-]+?\.)?((?:trainer|train|evaluate|sample|release|model)\.\w+)")
    assert len(keys) >= 15
    files = ("py", "csv", "json", "md", "png", "yaml", "ckpt")
    bad = sorted({
        f"{page}: {key}" for page, key in keys
        if key.split(".")[1] not in files and key.split(".")[1] not in fields[key.split(".")[0]]
    })
    assert not bad, f"docs name parameter keys that params.yaml's sections do not have: {bad}"


def resolve(dotted: str) -> object:
    """The object a dotted name `sdn.module.attribute...` refers to."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_every_python_name_exists():
    names = mentions(r"`(sdn(?:\.\w+)+)`")
    assert len(names) >= 15
    bad = []
    for page, name in sorted(set(names)):
        try:
            resolve(name)
        except (AttributeError, ModuleNotFoundError) as error:
            bad.append(f"{page}: {name} ({error})")
    assert not bad, f"docs name Python objects that do not exist: {bad}"



def test_every_code_name_exists():
    """Backticked names that look like code (`LadderLayer.down`, `_free_bits`, `enabled_runs`) must
    occur in the code or the pipeline's files: a renamed function leaves no stale name behind."""
    code = [*(REPO / "sdn").rglob("*.py"), *(REPO / "stages").glob("*.py")]
    files = [REPO / name for name in ("params.yaml", "paper.yaml", "dvc.yaml", "Makefile")]
    corpus = "\n".join(path.read_text() for path in code + files)
    checked, bad = 0, set()
    for page, name in mentions(r"`([A-Za-z_]\w*(?:\.\w+)*)(?:\(\))?`"):
        looks_like_code = "_" in name or "." in name or re.search("[A-Z]", name[1:])
        file_name = re.search(r"\.(py|csv|json|md|png|yaml|ckpt|sh|npy|html)$", name)
        maths_symbol = re.fullmatch(r"[A-Za-z]_\w+", name)  # P_in, P_obs: subscripted symbols
        if name.startswith("sdn.") or not looks_like_code or file_name or maths_symbol:
            continue
        checked += 1
        for part in name.split("."):
            if not re.search(rf"(?<!\w){re.escape(part)}(?!\w)", corpus):
                bad.add(f"{page}: {name}")
    assert checked > 50
    assert not bad, f"docs name things the code does not have: {sorted(bad)}"

def anchors(page: Path) -> set[str]:
    return set(re.findall(r'<a id="([\w-]+)"></a>', page.read_text()))


def test_anchors_are_unique_within_a_page():
    for page in PAGES:
        ids = re.findall(r'<a id="([\w-]+)"></a>', page.read_text())
        assert len(ids) == len(set(ids)), f"{page.name} repeats an anchor"


def test_every_link_between_pages_resolves():
    bad = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([\w-]*\.md)?(?:#([\w-]+))?\)", page.read_text()):
            linked = DOCS / target if target else page
            if not linked.is_file() or (anchor and anchor not in anchors(linked)):
                bad.append(f"{page.name}: ({target}#{anchor})")
    assert not bad, f"broken links: {bad}"


def test_every_citation_of_docs_resolves():
    citations = []
    for path in CITING:
        for page, anchor in re.findall(r"docs/([\w-]+\.md)(?:#([\w-]+))?", path.read_text()):
            citations.append((path.relative_to(REPO), page, anchor))
    assert citations, "the code should cite docs/ where it implements what the pages describe"
    bad = [
        f"{where}: docs/{page}#{anchor}" for where, page, anchor in citations
        if not (DOCS / page).is_file() or (anchor and anchor not in anchors(DOCS / page))
    ]
    assert not bad, f"citations of docs/ that point nowhere: {bad}"


def test_nothing_cites_a_file_outside_the_project():
    outside = "SDN_" + "SPEC"  # spelt in two parts so that this file would not match itself
    found = [str(path.relative_to(REPO)) for path in CITING + PAGES if outside in path.read_text()]
    assert not found, f"{found} cite a specification that is not part of the project: cite docs/ instead"



def defined_names(path: Path) -> dict[str, set[str]]:
    """The names a module defines at its top level (functions, classes, assignments), each mapped
    to the names its class body defines (empty for anything else). Imported names do not count."""
    import ast

    defined: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defined[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    members.add(item.name)
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                    members |= {t.id for t in targets if isinstance(t, ast.Name)}
            defined[node.name] = members
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined[name.id] = set()
    return defined


FILE_SUFFIX = r"\.(py|yaml|json|csv|md|png|ckpt)$"
PARAMS_SECTIONS = ("trainer", "train", "evaluate", "sample", "model", "release")


def module_map() -> list[tuple[str, str]]:
    """(module file, Python name) for each name a row of docs/modules.md's map places in its
    module: the backticked identifiers (`name`, `Class`, `Class.method`, `name(args)`) of the row
    of `sdn/...py`. Backticked text that is no identifier (paths, commands, `.part`) is skipped,
    and so are the lowercase names without an underscore (`inspect`, a command) and the names
    the row itself marks as keys of a file (`trainer.devices`, eval.json's figures)."""
    text = (DOCS / "modules.md").read_text()
    table = text[text.index('<a id="map">'):text.index('<a id="where-to-change">')]
    placed = []
    for module, row in re.findall(r"^\| `(sdn/[\w/]+\.py)` \| (.*) \|$", table, flags=re.M):
        for code in re.findall(r"`([^`]+)`", row):
            name = re.sub(r"\(.*\)$", "", code)
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?", name) or re.search(FILE_SUFFIX, name):
                continue
            first = name.split(".")[0]
            if first in (*PARAMS_SECTIONS, "sdn") or first.startswith("nyquist_share_"):
                continue  # a params key, a dotted path into the package, eval.json's figures
            if first.islower() and "_" not in first and "." not in name:
                continue  # a word or a command (`inspect`, `readme`), no name of the module
            placed.append((module, name))
    return placed


def test_module_map_parsing_finds_names_in_their_rows():
    placed = module_map()
    assert ("sdn/schema.py", "build_section") in placed
    assert ("sdn/data/sources.py", "convert_dataset") in placed
    assert ("sdn/training/module.py", "VAEModule") in placed
    assert len(placed) >= 40


def test_every_name_the_module_map_places_is_defined_in_that_module():
    bad = []
    for module, name in module_map():
        if module.endswith("__init__.py"):  # a package's row names what it re-exports
            package = importlib.import_module(module.removesuffix("/__init__.py").replace("/", "."))
            if not hasattr(package, name):
                bad.append(f"{module}: {name}")
            continue
        defined = defined_names(REPO / module)
        first, _, member = name.partition(".")
        if first not in defined or (member and member not in defined[first]):
            bad.append(f"{module}: {name}")
    assert not bad, f"docs/modules.md places names in modules that do not define them: {bad}"
