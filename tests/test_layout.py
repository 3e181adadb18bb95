"""The house: every file says first what it is, the imports between the project's files run one way (no circles), so
that each file reads, and copies, with only the files below it; the top level stays small, and every link in the
README and docs/ leads somewhere."""
import ast
import glob
import os
import re

from conftest import ROOT

FILES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py")))
FILES = [f for f in FILES if os.path.relpath(f, ROOT).split(os.sep)[0] not in ("tests", ".venv")]


def module(path):  # "sampler", "shapes.world", "tools.bench"
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


MODULES = {module(f) for f in FILES}


def project_imports(path):
    """The project's modules that `path` imports anywhere (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module in MODULES:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
    return found - {module(path)}


def test_every_file_opens_with_a_docstring():
    for path in FILES:
        doc = ast.get_docstring(ast.parse(open(path).read()))
        assert doc and len(doc.split()) >= 5, f"{path} does not say what it is"


def test_the_top_level_is_small_and_every_file_short():
    top = glob.glob(os.path.join(ROOT, "*.py"))
    assert len(top) <= 12, sorted(map(os.path.basename, top))
    for path in FILES:
        n = len(open(path).read().splitlines())
        assert n <= 600, f"{os.path.relpath(path, ROOT)}: {n} lines; split it by concept"


def test_imports_between_files_run_one_way():
    graph = {module(f): project_imports(f) for f in FILES}
    assert graph["sampler"] == set() and graph["lora"] == set() and graph["grid"] == set()  # the leaves a student reads
    core = ("lora", "sampler", "flow", "rewards", "model", "runs", "memory", "train", "ddpo", "sample")
    for name in core:  # the tools and the shapes models' training are never part of a run
        assert not {m for m in graph[name] if m.startswith(("tools", "shapes.train", "studies"))}, (name, graph[name])
    for name in ("rewards", "runs"):  # the shapes world and its counter only, never its training code
        assert {m for m in graph[name] if m.startswith("shapes")} <= {"shapes.world", "shapes.counter"}, graph[name]
    done, visiting = set(), []

    def visit(name):  # depth-first; meeting a module still on the stack is a circle
        assert name not in visiting, "import circle: " + " -> ".join(visiting[visiting.index(name):] + [name])
        if name not in done:
            visiting.append(name)
            for dep in sorted(graph[name]):
                visit(dep)
            visiting.pop()
            done.add(name)
    for name in graph:
        visit(name)


def test_every_link_in_the_readme_and_docs_resolves():
    pages = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    for page in pages:
        text = open(page).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            assert os.path.exists(path), f"{os.path.relpath(page, ROOT)} links to {target}, which does not exist"
