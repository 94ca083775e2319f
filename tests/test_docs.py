"""The documentation stands on its own: no reference to notes outside the repository, and every
relative link (README.md, docs/*.md, benchmarks/README.md, ``docs/...md#anchor`` in code) resolves
to a file, and to a heading of that file when it names one."""

from __future__ import annotations

import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".venv", "venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".jax_cache", "demo_out",
             "data", "node_modules", "shared"}
# Notes that live outside this repository; code and docs must not send a reader there. (Written in
# pieces, so that grepping the repository for them finds nothing, this file included.)
OUTSIDE = tuple(a + b for a, b in [("spec ", "§"), ("shared/", "docs"), ("design", ".md"), ("../", "shared"),
                                   ("fastvit_", "spec"), ("jax_", "anchors")])


def _files(exts=(".py", ".md")):
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames
                       if d not in SKIP_DIRS and not d.endswith(".egg-info") and not d.startswith("workdir")]
        for name in filenames:
            if name.endswith(exts):
                yield os.path.join(dirpath, name)


def _rel(path):
    return os.path.relpath(path, ROOT).replace(os.sep, "/")


def test_no_reference_outside_the_repository():
    hits = []
    for path in _files():
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                for pat in OUTSIDE:
                    if pat in line:
                        hits.append(f"{_rel(path)}:{n}: {pat!r}: {line.strip()[:120]}")
    assert not hits, "references to notes outside the repository:\n" + "\n".join(hits)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"\]\([^)]*\)|[`*\[]", "", heading.strip().lower())
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(md_path: str) -> set:
    with open(md_path, encoding="utf-8") as f:
        text = _strip_fences(f.read())
    out, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def _strip_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _strip_code(text: str) -> str:
    """Text without fenced blocks and inline code spans (which hold examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", _strip_fences(text))


def _md_files():
    return sorted(p for p in _files((".md",)))


def _check_target(source: str, target: str):
    """None if ``target`` (relative to ``source``'s folder) exists, with its #anchor; else the problem."""
    path, _, fragment = target.partition("#")
    base = os.path.dirname(source)
    full = os.path.normpath(os.path.join(base, path)) if path else source
    rel = _rel(full)
    if not os.path.exists(full):
        return f"{target}: no file {rel}"
    if fragment and full.endswith(".md") and fragment not in anchors(full):
        return f"{target}: no heading #{fragment} in {rel}"
    return None


@pytest.mark.parametrize("md", _md_files(), ids=_rel)
def test_relative_links_resolve(md):
    with open(md, encoding="utf-8") as f:
        text = _strip_code(f.read())
    bad = []
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        problem = _check_target(md, target)
        if problem:
            bad.append(problem)
    assert not bad, f"{_rel(md)}:\n" + "\n".join(bad)


def test_docs_references_in_code_resolve():
    """``docs/<name>.md#anchor`` written in code comments and docstrings points at a real heading."""
    bad = []
    for path in _files((".py",)):
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                for m in re.finditer(r"\b(docs/[\w./-]+\.md(?:#[\w-]+)?)", line):
                    problem = _check_target(os.path.join(ROOT, "README.md"), m.group(1))
                    if problem:
                        bad.append(f"{_rel(path)}:{n}: {problem}")
    assert not bad, "\n".join(bad)


def test_slug_matches_github():
    assert slug("RepMixer") == "repmixer"
    assert slug("Two commands") == "two-commands"
    assert slug("CPU host memory") == "cpu-host-memory"
    assert slug("Deploying (ONNX, TFLite)") == "deploying-onnx-tflite"
    assert slug("Training (`train_tpu.py`)") == "training-train_tpupy"
    assert slug("Conv + BN → one conv") == "conv--bn--one-conv"


# ---------------------------------------------------------------- commands written in the docs
DOC_FILES = ("README.md", "benchmarks/README.md", "docs/architecture.md", "docs/training.md", "docs/performance.md")


def _commands():
    """(doc, command line) of every `python ...` / `make ...` line in the docs' bash blocks."""
    out = []
    for doc in DOC_FILES:
        path = os.path.join(ROOT, doc)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].split(" # ")[0].strip()
                if line.startswith(("python ", "make ")):
                    out.append((doc, line))
    return out


def _flag_sources(argv):
    """The Python files whose string literals define the flags of ``python ARGV...``."""
    if argv[0] == "-m":
        spec = argv[1].replace(".", "/")
        files = [os.path.join(ROOT, spec + ".py"), os.path.join(ROOT, spec, "__main__.py")]
    else:
        files = [os.path.join(ROOT, argv[0])]
    files = [f for f in files if os.path.exists(f)]
    if files:  # helpers of the same package (e.g. convert/core.py) may define shared flags
        pkg = os.path.dirname(files[0])
        files += [os.path.join(pkg, n) for n in os.listdir(pkg) if n.endswith(".py")]
    return files


def test_documented_commands_exist():
    """Every `make` target exists; every `python` entry point exists and defines the flags used.
    (train_tpu.py's flags are parsed for real; the README's quick start also runs, in
    test_readme_quickstart.py.)"""
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        targets = set(re.findall(r"^([\w-]+):", f.read(), flags=re.M))
    bad = []
    commands = _commands()
    assert any(c.startswith("make demo") for _, c in commands) and any("train_tpu.py" in c for _, c in commands)
    for doc, command in commands:
        argv = command.split()
        if argv[0] == "make":
            bad += [f"{doc}: {command}: no target {t!r}" for t in argv[1:] if t not in targets]
            continue
        argv = argv[1:]
        if argv[0] == "train_tpu.py":
            import shlex
            import sys

            sys.path.insert(0, ROOT)
            import train_tpu

            args = shlex.split(command.replace("$TFDS_DATA_DIR", "/data"))[2:]
            try:
                train_tpu.build_parser().parse_args(args)
            except SystemExit as e:
                if e.code:
                    bad.append(f"{doc}: {command}: train_tpu.py rejects these flags")
            continue
        sources = _flag_sources(argv)
        if not sources:
            bad.append(f"{doc}: {command}: no such entry point")
            continue
        text = "".join(open(p, encoding="utf-8").read() for p in sources)
        own, _, child = command.partition(" -- ")  # the launcher's flags, then the command it runs
        if child.startswith("train_tpu.py"):
            commands.append((doc, "python " + child))
        for flag in re.findall(r"(?<!\S)(--[\w-]+)", own):
            if f'"{flag}"' not in text and f"'{flag}'" not in text and flag != "--help":
                bad.append(f"{doc}: {command}: {flag} is not defined by {_rel(sources[0])}")
    assert not bad, "\n".join(bad)
