"""runtime.confine: a process that confined itself cannot write files, run programs or open
network connections, and still reads (issue 16: the runtime confines itself)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = r"""
import socket, subprocess, sys
from runtime.confine import confine_renderer
why = confine_renderer()
if why:
    print("UNAVAILABLE", why)
    sys.exit(0)
def attempt(name, act):
    try:
        act()
        print(name, "allowed")
    except OSError as e:
        print(name, "refused", e.errno)
attempt("write", lambda: open(sys.argv[1], "w").write("x"))
attempt("exec", lambda: subprocess.run(["/bin/true"]))
attempt("connect", lambda: socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5))
attempt("read", lambda: open(__import__("runtime").__file__).read())
"""


def test_a_confined_process_cannot_write_exec_or_connect(tmp_path):
    import socket

    with socket.socket() as listener:  # something to connect to, were it allowed
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        target = tmp_path / "written"
        out = subprocess.run([sys.executable, "-c", PROBE, str(target), str(port)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("UNAVAILABLE"):
        pytest.skip(out.stdout)
    result = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert result["write"].startswith("refused") and not target.exists()
    assert result["exec"].startswith("refused")
    assert result["connect"].startswith("refused")
    assert result["read"] == "allowed"


def test_the_renderer_runs_confined():
    from runtime.chat import ChatTemplate
    from runtime.chat_worker import renderer

    assert ChatTemplate("{{ messages[0].content }}").render([{"role": "user", "content": "hi"}]) == "hi"
    process = renderer()._process
    status = Path(f"/proc/{process.pid}/status").read_text()
    if renderer().unconfined:
        pytest.skip(renderer().unconfined)
    assert "Seccomp:\t2" in status  # a filter is loaded


def test_unsecure_turns_it_off_and_info_says_which(gemma_path):
    from click.testing import CliRunner

    from runtime.chat import ChatTemplate
    from runtime.chat_worker import renderer
    from runtime.cli import main

    r = renderer()
    r.close()
    r.confine = False
    try:
        assert ChatTemplate("{{ 'ok' }}").render([{"role": "user", "content": "x"}]) == "ok"
        assert "Seccomp:\t0" in Path(f"/proc/{r._process.pid}/status").read_text()
    finally:
        r.close()
        r.confine = True
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "--info"]).stdout
    assert re.search(r"confinement: the server \(files\) and the chat template renderer, with (Landlock|nothing)", out)
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "--info", "--unsecure"]).stdout
    assert "confinement: the server (files) and the chat template renderer, off (--unsecure)" \
        in out


SERVING_PROBE = r"""
import os, subprocess, sys, threading
from runtime.confine import confine_server
model, outside, cache = sys.argv[1:4]
why = confine_server([model])
if why:
    print("UNAVAILABLE", why)
    sys.exit(0)
results = {}
def attempt(name, act):
    try:
        act()
        results[name] = "allowed"
    except OSError as e:
        results[name] = f"refused {e.errno}"
def probe():  # a thread started afterwards, as the server's are
    attempt("read-model", lambda: open(model, "rb").read(4))
    attempt("read-outside", lambda: open(outside).read())
    attempt("write-outside", lambda: open(outside + ".new", "w").write("x"))
    attempt("write-cache", lambda: open(os.path.join(cache, "modelrun", "x"), "w").write("x"))
    attempt("import", lambda: __import__("xml.dom.minidom"))
    attempt("renderer", lambda: subprocess.run([sys.executable, "-c", "import jinja2"], check=True))
thread = threading.Thread(target=probe)
thread.start()
thread.join()
for name, result in results.items():
    print(name, result)
"""


def test_the_serving_process_reads_only_what_it_needs(tmp_path):
    """Issue 16: the server process confines itself too (Landlock, before its threads
    start). A thread started afterwards reads the model, imports modules, starts the
    renderer (Python again) and writes in the cache folder, and is refused any other file."""
    model, outside, cache = tmp_path / "m.gguf", tmp_path / "private.txt", tmp_path / "cache"
    model.write_bytes(b"GGUF")
    outside.write_text("not for the server")
    out = subprocess.run([sys.executable, "-c", SERVING_PROBE, str(model), str(outside),
                          str(cache)], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("UNAVAILABLE"):
        pytest.skip(out.stdout)
    result = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert result == {"read-model": "allowed", "read-outside": "refused 13",
                      "write-outside": "refused 13", "write-cache": "allowed",
                      "import": "allowed", "renderer": "allowed"}, out.stderr
    assert not (tmp_path / "private.txt.new").exists()
