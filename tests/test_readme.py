"""The Python snippets of the README and of docs/*.md run as written, so they cannot rot.

Each ```python block runs in its own interpreter, in README order and then docs/ in name order, in
one folder that holds what the README's commands make there (photo.jpg, deit_small_keep0.7.onnx;
the docs build on the README's quick start), on a tiny model:
deit_tiny stands in for deit_small (the same code paths in a fraction of the time). A comment
right before a block says how it runs when it needs more:

    <!-- readme-test: server -->        with `evit-deploy serve deit_small_keep0.7.onnx` running
    <!-- readme-test: argv A B -->       as a script with these arguments
    <!-- readme-test: skip (why) -->     not here
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SAMPLE_IMAGE, SMALL, TINY, cli_env, config_for

README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<how>[^\n]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
README_PORT = 8000  # what the snippets connect to: `serve`'s default port


@dataclass(frozen=True)
class Snippet:
    page: str  # README.md, docs/serving.md, ...
    line: int
    how: str  # "", "server", "argv ...", "skip (...)"
    code: str


def readme_snippets() -> list[Snippet]:
    snippets = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(REPO_ROOT).as_posix()
        snippets += [
            Snippet(name, text.count("\n", 0, match.start("code")) + 1, match["how"] or "", match["code"])
            for match in BLOCK.finditer(text)
        ]
    return snippets


SNIPPETS = readme_snippets()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, onnx_export) -> Path:
    """What the README's commands before the snippets leave in the working folder."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copyfile(SAMPLE_IMAGE, folder / "photo.jpg")
    shutil.copyfile(onnx_export(config_for(TINY, 0.7)).path, folder / "deit_small_keep0.7.onnx")
    return folder


def consecutive_free_ports(count: int) -> int:
    """A port p with p .. p+count-1 free: `serve` puts gRPC, metrics and REST at port+1..+3."""
    for base in range(21000, 60000, 97):
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def server_port(folder) -> int:
    """`evit-deploy serve deit_small_keep0.7.onnx`, on free ports instead of 8000..8003."""
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("needs the serve extra: pip install 'evit-deploy[serve]'")
    from evit_deploy.serve import EvitServer, ServeOptions

    port = consecutive_free_ports(4)
    server = EvitServer(folder / "deit_small_keep0.7.onnx", ServeOptions(port=port, shutdown_timeout_s=5))
    server.start(ready_timeout_s=120)
    yield port
    server.stop()


def test_the_readme_has_snippets_and_every_one_says_how_it_runs():
    assert sum(snippet.page == "README.md" for snippet in SNIPPETS) >= 2
    assert len(SNIPPETS) >= 5
    for snippet in SNIPPETS:
        assert snippet.how == "" or snippet.how.split()[0] in ("server", "argv", "skip"), snippet


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: f"{s.page} line {s.line}")
def test_snippet_runs_as_written(snippet: Snippet, folder, request):
    kind, _, rest = snippet.how.partition(" ")
    if kind == "skip":
        pytest.skip(f"{snippet.page} line {snippet.line}: {rest}")
    code = snippet.code.replace(SMALL, TINY)
    argv = rest.split() if kind == "argv" else []
    if kind == "server":
        port = request.getfixturevalue("server_port")
        code = code.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{port}")
    script = folder / f"{Path(snippet.page).stem.lower()}_line_{snippet.line}.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, script.name, *argv], cwd=folder, env=cli_env(), capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{snippet.page} line {snippet.line}:\n{code}\n{proc.stdout}{proc.stderr}"


SHELL_BLOCK = re.compile(r"```(?:bash|console)\n(.*?)```", re.S)
WRITES_TO = ("-o", "--output", "--json-out", "--plot", ">")  # the option (or redirection) that names an output


def test_no_command_in_the_docs_writes_over_a_tracked_file():
    """Following the README and docs/ leaves the clone's own files as they were: examples write
    under build/ or beside the user's own files, never over docs/*.png or benchmarks/*.json."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: which files are tracked is unknown")
    tracked = set(listed.stdout.split())
    written = []
    for page in PAGES:
        for block in SHELL_BLOCK.findall(page.read_text(encoding="utf-8")):
            for command in block.replace("\\\n", " ").splitlines():
                words = shlex.split(command.removeprefix("$ "), comments=True)
                written += [(page.name, target.rstrip("/")) for option, target in zip(words, words[1:]) if option in WRITES_TO]
    assert written, "no output found: the parsing is broken"
    over = [(page, target) for page, target in written if target in tracked or any(f.startswith(target + "/") for f in tracked)]
    assert over == [], over
