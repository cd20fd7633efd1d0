"""The arrows between rooms (ARCHITECTURE.md, "Imports point inward"): a plain AST walk over
every module of the product packages; an import that breaks the table fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Room -> the rooms it may import (besides itself). Keep in step with ARCHITECTURE.md.
ALLOWED: dict[str, set[str]] = {
    "policy": set(),
    "templates": set(),
    "mime": set(),
    "store": {"policy", "mime", "templates"},
    "imap": {"store", "mime", "policy"},
    "smtp_in": {"store", "mime", "policy"},
    "outbound": {"store", "mime", "policy", "templates"},
    "web": {"store", "mime", "policy", "templates"},
    "gateway": {"policy", "templates", "mime", "store", "imap", "smtp_in", "outbound", "web"},
}

#: Module prefix -> room (the longest prefix wins).
ROOMS = {
    "imap_store": "store",  # the package itself holds nothing but its three rooms
    "policy": "policy",
    "templates": "templates",
    "imap_store.mime": "mime",
    "imap_store.store": "store",
    "imap_store.imap": "imap",
    "smtp_in": "smtp_in",
    "outbound": "outbound",
    "web": "web",
    "gateway": "gateway",
}


def room_of(module: str) -> str | None:
    best = None
    for prefix, room in ROOMS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[0])):
            best = (prefix, room)
    return best[1] if best else None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules(root: Path) -> list[Path]:
    files: list[Path] = []
    for package in ("policy", "templates", "imap_store", "smtp_in", "outbound", "web",
                    "gateway"):
        files.extend(p for p in (root / package).rglob("*.py")
                     if "migrations" not in p.parts)
    return sorted(files)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (functions, TYPE_CHECKING)."""
    tree = ast.parse(path.read_text("utf-8"), str(path))
    name = module_name(path, root)
    package = name.rpartition(".")[0] if path.name != "__init__.py" else name
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = ".".join(x for x in (anchor, base) if x)
            found.append((node.lineno, base))
            # "from imap_store import store" names a sub-module too
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names
                         if room_of(f"{base}.{alias.name}") != room_of(base))
    return found


def broken_arrows(root: Path = ROOT) -> list[str]:
    broken = []
    for path in product_modules(root):
        mine = room_of(module_name(path, root))
        assert mine is not None, f"{path} is in no room: add it to ROOMS and ARCHITECTURE.md"
        for line, target in imports_of(path, root):
            theirs = room_of(target)
            if theirs is None or theirs == mine:
                continue
            if theirs not in ALLOWED[mine]:
                broken.append(f"{path.relative_to(root)}:{line}: {mine} -> {theirs} ({target})")
    return sorted(broken)


def test_imports_point_inward() -> None:
    assert broken_arrows() == []


def test_the_walk_sees_broken_arrows(tmp_path: Path) -> None:
    """The checker itself can fail: imports hidden in a function, relative imports and
    ``from package import module`` are all seen."""
    for package in ("policy", "smtp_in", "imap_store/store", "gateway"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text("", "utf-8")
    (tmp_path / "policy" / "rules.py").write_text(
        "def f():\n    from imap_store.store import ops\n    return ops\n", "utf-8")
    (tmp_path / "policy" / "engine.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from imap_store import mime\n",
        "utf-8")
    (tmp_path / "smtp_in" / "server.py").write_text(
        "import gateway.config\nfrom imap_store import store\nfrom . import settings\n", "utf-8")
    (tmp_path / "imap_store" / "store" / "ops.py").write_text(
        "from ...smtp_in import server\n", "utf-8")
    assert broken_arrows(tmp_path) == [
        "imap_store/store/ops.py:1: store -> smtp_in (smtp_in)",
        "policy/engine.py:3: policy -> mime (imap_store.mime)",
        "policy/engine.py:3: policy -> store (imap_store)",
        "policy/rules.py:2: policy -> store (imap_store.store)",
        "smtp_in/server.py:1: smtp_in -> gateway (gateway.config)",
    ]


def test_architecture_md_draws_the_same_arrows() -> None:
    """Each room's line in ARCHITECTURE.md's table lists exactly the rooms ALLOWED gives it."""
    text = (ROOT / "ARCHITECTURE.md").read_text("utf-8")
    rows: dict[str, set[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[0].endswith("`"):
            room = cells[0].strip("`")
            if room in ALLOWED:
                allowed = cells[2].replace("`", "")
                rows[room] = set() if allowed in ("—", "-", "nothing") else {
                    a.strip() for a in allowed.split(",")}
    assert rows == ALLOWED


def test_admin_cli_loads_no_protocol_server() -> None:
    """mssante-policy is an edge of its own: it loads neither aiosmtpd nor the IMAP server."""
    code = ("import sys, gateway.admin; "
            "print(sorted(m for m in sys.modules if m.startswith(('aiosmtpd', "
            "'imap_store.imap.server', 'imap_store.imap.session', 'smtp_in.server', "
            "'outbound.worker'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"


def test_every_package_is_packaged() -> None:
    """pyproject.toml lists the packages by hand: a new sub-package must be in the list, or a
    regular (non-editable) install ships without it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
                 ["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent / "__init__.py") for p in product_modules(ROOT)
             if p.name == "__init__.py"}
    found |= {"imap_store.store.migrations", "imap_store.store.migrations.versions"}
    assert found == listed
