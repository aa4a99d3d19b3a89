"""The layering contract of blockcrypt's packages, checked over the source with `ast`.

Dependencies point one way: front ends (cli/, mount/) -> control plane (control/)
-> {volume/, keys/, catalog/}; volume/ -> {format/, crypto/, storage/}; leaves
(_util/, errors.py) import nothing above them. crypto/, format/ and storage/
import no FUSE binding, no click, no sqlite3 and no SDK; the data plane never
imports the control plane; only mount/ imports a FUSE binding and only cli/
imports click; no circle among blockcrypt's modules at import time.

Every import counts, also one inside a function: a lazy import is still a
dependency, for the layers and for circles alike.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent / "blockcrypt"

LEAVES = {"errors", "_util", "__init__", "__main__"}
NATIVE = {"_xts", "_aead", "_engine"}
DATA_PLANE = {"format", "crypto", "storage", "volume"}
#: package -> the blockcrypt packages it may import (besides itself and the leaves)
ALLOWED = {
    "errors": set(),
    "_util": set(),
    "format": set(),
    "crypto": {"_xts", "_aead"},
    "storage": set(),
    "catalog": set(),
    "volume": {"format", "crypto", "storage", "_engine"},
    "keys": {"format", "vault"},              # vault: only its client (checked below)
    "vault": set(),
    "control": {"volume", "keys", "catalog", "format", "crypto", "storage", "vault", "_engine"},
    "mount": {"control", "volume", "keys", "catalog", "format", "crypto", "storage", "_engine"},
    "cli": {"control", "mount", "vault", "keys", "catalog", "format", "crypto", "storage", "volume"},
    "__init__": set(),
    "__main__": {"cli"},
}
FUSE = {"fuse", "mfusepy", "pyfuse3", "llfuse"}
SDKS = {"azure", "hvac", "pkcs11", "kmip", "requests", "rados", "rbd", "boto3"}
#: third-party modules a package must not import
FORBIDDEN = {p: FUSE | {"click", "sqlite3"} | SDKS for p in ("format", "crypto", "storage")}
FORBIDDEN["volume"] = FUSE | {"click", "sqlite3"} | SDKS
FORBIDDEN.update({p: FUSE | {"click"} for p in ("errors", "_util", "catalog", "keys", "control", "vault")})
FORBIDDEN["mount"] = {"click"}
FORBIDDEN["cli"] = FUSE


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def collect(root: Path) -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported module, at module level, line)] for every import in the tree."""
    files = {_module_name(root, p): p for p in root.rglob("*.py")}
    mods = set(files)
    out: dict[str, list[tuple[str, bool, int]]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        top_level = {id(n) for n in tree.body}
        for stmt in tree.body:  # `if TYPE_CHECKING:`/try blocks at module level still run
            if isinstance(stmt, (ast.If, ast.Try)):
                top_level |= {id(n) for n in ast.walk(stmt)}
        found = []
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module) if node.level else node.module
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    names.append(sub if sub in mods else base)
            for n in names:
                found.append((n, id(node) in top_level, node.lineno))
        out[mod] = found
    return out


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def violations(root: Path) -> list[str]:
    top = root.name
    graph = collect(root)
    bad = []
    for mod, imports in sorted(graph.items()):
        pkg = _package(mod)
        for name, _tl, line in imports:
            where = f"{mod}:{line} imports {name}"
            if name == top or name.startswith(top + "."):
                dep = _package(name) if name != top else "__init__"
                if dep == pkg or dep in LEAVES:
                    continue
                if dep not in ALLOWED.get(pkg, set()):
                    bad.append(f"{where}: {pkg}/ may not import {dep}/")
                elif pkg == "keys" and dep == "vault" and name != f"{top}.vault.client":
                    bad.append(f"{where}: keys/ may use only the vault's client")
                if pkg in DATA_PLANE and dep not in DATA_PLANE | NATIVE:
                    bad.append(f"{where}: the data plane may not import the control plane")
            else:
                first = name.split(".")[0]
                if first in FORBIDDEN.get(pkg, set()):
                    bad.append(f"{where}: {pkg}/ may not import {first}")
    return bad


def circles(root: Path) -> list[list[str]]:
    """Strongly connected components (size > 1) of the import graph, lazy imports included."""
    top = root.name
    graph = {m: sorted({n for n, _tl, _ in v if n != m and (n == top or n.startswith(top + "."))})
             for m, v in collect(root).items()}
    sys.setrecursionlimit(10000)
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_blockcrypt_layers():
    assert violations(ROOT) == []


def test_no_import_circle():
    assert circles(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "blockcrypt"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return root


def test_the_check_finds_a_crypto_module_importing_fuse_and_the_catalog(tmp_path):
    root = _tree(tmp_path, {"crypto/bad.py": "import fuse\nfrom ..catalog import Catalog\n",
                            "catalog/__init__.py": "Catalog = 1\n"})
    found = violations(root)
    assert any("crypto/ may not import fuse" in v for v in found)
    assert any("crypto/ may not import catalog/" in v for v in found)
    assert any("data plane may not import the control plane" in v for v in found)


def test_the_check_finds_a_lazy_upward_import(tmp_path):
    root = _tree(tmp_path, {"volume/v.py": "def f():\n    from ..control import disks\n",
                            "control/disks.py": ""})
    assert any("volume/ may not import control/" in v for v in violations(root))


def test_the_check_finds_a_circle(tmp_path):
    root = _tree(tmp_path, {"control/a.py": "from . import b\n", "control/b.py": "from .a import x\n"})
    assert circles(root) == [["blockcrypt.control.a", "blockcrypt.control.b"]]


def test_every_blockcrypt_import_resolves():
    """Lazy imports inside functions run only on their path: check each names something real."""
    import importlib
    missing = []
    for path in ROOT.rglob("*.py"):
        mod = _module_name(ROOT, path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("blockcrypt")):
                continue
            base = _resolve(mod, path.name == "__init__.py", node.level, node.module) if node.level else node.module
            try:
                m = importlib.import_module(base)
            except ImportError as e:
                if base.split(".")[-1] not in NATIVE:  # extensions may be unbuilt in a bare checkout
                    missing.append(f"{mod}:{node.lineno}: {base} ({e})")
                continue
            for a in node.names:
                if not hasattr(m, a.name) and importlib.util.find_spec(f"{base}.{a.name}") is None:
                    missing.append(f"{mod}:{node.lineno}: {base}.{a.name}")
    assert missing == []
