"""The house: every file says first what it is, and the imports between the project's files run one way (no
circles), so that each file reads, and copies, with only the files below it."""
import ast
import glob
import os

from conftest import ROOT

FILES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "studies", "*.py")))
MODULES = {os.path.basename(f)[:-3] for f in FILES}


def project_imports(path):
    """The project's modules that `path` imports anywhere (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module in MODULES:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "studies":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
    return found


def test_every_file_opens_with_a_docstring():
    for path in FILES:
        doc = ast.get_docstring(ast.parse(open(path).read()))
        assert doc and len(doc.split()) >= 5, f"{path} does not say what it is"


def test_imports_between_files_run_one_way():
    graph = {os.path.basename(f)[:-3]: project_imports(f) for f in FILES}
    assert graph["sampler"] == set() and graph["lora"] == set() and graph["grid"] == set()  # the leaves a student reads
    assert "rewards" not in graph["shapes"] and "shapes" in graph["rewards"]  # the shapes world registers nothing back
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
