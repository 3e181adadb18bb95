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


def test_the_readme_states_each_files_length():
    """The README's file list gives each file's length, and the core's: they must stay true (within 10%: a file's
    count need not be rewritten for every line added, but a number read before a split or a rewrite is caught)."""
    import re
    readme = open(os.path.join(ROOT, "README.md")).read()
    stated = dict(re.findall(r"^ {4}(\S+\.py) +(\d+) lines", readme, re.M))
    assert {"lora.py", "sampler.py", "flow.py", "rewards.py", "train.py", "model.py"} <= set(stated), stated
    lines = {name: len(open(os.path.join(ROOT, name)).read().splitlines()) for name in stated}
    for name, n in stated.items():
        assert abs(int(n) - lines[name]) <= 0.1 * lines[name], f"README: {name} {n} lines; it has {lines[name]}"
    core = int(re.search(r"The core \(lora.py, sampler.py, flow.py, rewards.py, train.py\) is (\d+) lines",
                         readme).group(1))
    actual = sum(lines[name] for name in ("lora.py", "sampler.py", "flow.py", "rewards.py", "train.py"))
    assert abs(core - actual) <= 0.1 * actual, f"README: the core is {core} lines; it has {actual}"
