"""runtime.confine (issue 16, "the runtime confines itself"): the renderer cannot write
files, run programs or open sockets; the serving process, once serving, reads only what it
needs, writes only its cache, runs no program and opens no connection, and still replaces a
renderer killed on overrun (forked by the launcher, runtime.chat_worker).

Errnos: a Landlock refusal is EACCES (13), a seccomp one EPERM (1, as runtime.confine asks).
Where this kernel lacks a layer, the tests that need it are skipped and say which.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import wait_until_serving, write_synthetic_model_with_tokenizer

REPO = Path(__file__).resolve().parent.parent
EACCES, EPERM = errno.EACCES, errno.EPERM


def _run_probe(probe: str, *args) -> dict[str, str]:
    """Run probe (Python source) in a fresh `python`, return {name: result} from its lines
    "name result"; skip when it says UNAVAILABLE (a layer this kernel lacks)."""
    out = subprocess.run([sys.executable, "-c", probe, *map(str, args)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("UNAVAILABLE"):
        pytest.skip(out.stdout)
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


ATTEMPT = r"""
import os
def io_uring():  # a ring would make sockets and connect without those system calls
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(425, 1, ctypes.create_string_buffer(120))  # io_uring_setup, x86-64
    if fd < 0:
        raise OSError(ctypes.get_errno(), "io_uring_setup")
    os.close(fd)
def attempt(name, act):
    try:
        act()
        results[name] = "allowed"
    except OSError as e:
        results[name] = f"refused {e.errno}"
results = {}
"""

RENDERER_PROBE = r"""
import socket, subprocess, sys
from runtime.confine import confine_renderer
missing = confine_renderer().warning("the renderer")
if missing:
    print("UNAVAILABLE", missing)
    sys.exit(0)
""" + ATTEMPT + r"""
attempt("write", lambda: open(sys.argv[1], "w").write("x"))
attempt("exec", lambda: subprocess.run(["/bin/true"]))
attempt("socket", lambda: socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5))
attempt("io_uring", io_uring)
attempt("read", lambda: open(__import__("runtime").__file__).read())
for name, result in results.items():
    print(name, result)
"""


def _listener() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def test_a_confined_renderer_cannot_write_exec_or_open_sockets(tmp_path):
    with _listener() as listener:  # something to connect to, were it allowed
        target = tmp_path / "written"
        result = _run_probe(RENDERER_PROBE, target, listener.getsockname()[1])
    assert result == {"write": f"refused {EACCES}", "exec": f"refused {EPERM}",
                      "socket": f"refused {EPERM}", "io_uring": f"refused {EPERM}",
                      "read": "allowed"}
    assert not target.exists()


SERVER_PROBE = r"""
import os, socket, subprocess, sys, threading
from runtime.chat import ChatTemplate, ChatTemplateError, ChatTemplateLimitError
from runtime.chat_worker import renderer
from runtime.confine import confine_server
model, outside, cache, port = sys.argv[1:5]
# what the server has before it confines itself: its listening socket, the launcher
listening = socket.socket()
listening.bind(("127.0.0.1", 0))
listening.listen()
print("listening", listening.getsockname()[1], flush=True)
made_before = socket.socket()
bound_before = socket.socket()
renderer().start()
missing = confine_server([model]).warning("the server")
if missing:
    print("UNAVAILABLE", missing)
    sys.exit(0)
""" + ATTEMPT + r"""
def render(text):
    return ChatTemplate("{% if messages[0].content == 'bomb' %}{% for i in range(100000) %}"
                        "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                        "{{ messages[0].content }}", check=False).render(
        [{"role": "user", "content": text}])
def bomb():
    try:
        results["bomb"] = f"rendered {render('bomb')}"
    except ChatTemplateLimitError:
        results["bomb"] = "stopped at the limit"
def launcher_gone():  # it cannot be started again without exec: said so
    os.kill(renderer()._launcher.pid, 9)
    renderer()._launcher.wait()
    renderer()._stop()
    try:
        results["launcher-gone"] = f"rendered {render('hi')}"
    except ChatTemplateError as e:
        results["launcher-gone"] = "restart" if "restart modelrun" in str(e) else str(e)
def probe():  # a thread started afterwards, as the server's are
    attempt("exec-subprocess", lambda: subprocess.run(["/bin/true"]))
    attempt("exec-execv", lambda: os.execv("/bin/true", ["/bin/true"]))
    attempt("connect", lambda: made_before.connect(("127.0.0.1", int(port))))
    attempt("new-socket", lambda: socket.socket())
    attempt("io_uring", io_uring)
    attempt("bind", lambda: bound_before.bind(("127.0.0.1", 0)))
    attempt("accept", lambda: listening.accept()[0].close())
    attempt("read-model", lambda: open(model, "rb").read(4))
    attempt("read-outside", lambda: open(outside).read())
    attempt("write-outside", lambda: open(outside + ".new", "w").write("x"))
    attempt("write-cache", lambda: open(os.path.join(cache, "modelrun", "x"), "w").write("x"))
    attempt("import", lambda: __import__("xml.dom.minidom"))
    attempt("render", lambda: render("hi") == "hi" or 1 / 0)
    bomb()
    attempt("render-again", lambda: render("hi") == "hi" or 1 / 0)
    results["renderers"] = str(renderer().starts)
    launcher_gone()
thread = threading.Thread(target=probe)
thread.start()
thread.join()
for name, result in results.items():
    print(name, result)
"""


def test_the_serving_process_cannot_exec_connect_or_write_outside_its_cache(tmp_path):
    """The serving process as runtime.cli's serve confines itself: a thread started after
    it may accept on the socket that was listening and read the model, its modules and
    write its cache; running a program, connecting, binding, making a socket and any other
    file are refused; a renderer killed on overrun is replaced (forked: no exec)."""
    model, outside, cache = tmp_path / "m.gguf", tmp_path / "private.txt", tmp_path / "cache"
    model.write_bytes(b"GGUF")
    outside.write_text("not for the server")
    with _listener() as target:  # an outside server it may not connect to
        env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_PROBE, *map(str, (model, outside, cache, target.getsockname()[1]))],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            first = proc.stdout.readline().split()
            assert first and first[0] == "listening", proc.stderr.read()
            with socket.create_connection(("127.0.0.1", int(first[1])), timeout=30):
                out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    if out.startswith("UNAVAILABLE"):
        pytest.skip(out)
    result = dict(line.split(" ", 1) for line in out.splitlines())
    assert result == {
        "exec-subprocess": f"refused {EPERM}", "exec-execv": f"refused {EPERM}",
        "connect": f"refused {EACCES}", "new-socket": f"refused {EPERM}",
        "io_uring": f"refused {EPERM}", "launcher-gone": "restart",
        "bind": f"refused {EACCES}", "accept": "allowed",
        "read-model": "allowed", "read-outside": f"refused {EACCES}",
        "write-outside": f"refused {EACCES}", "write-cache": "allowed", "import": "allowed",
        "render": "allowed", "bomb": "stopped at the limit", "render-again": "allowed",
        "renderers": "2"}, err
    assert not (tmp_path / "private.txt.new").exists()


FAIL_OPEN_PROBE = r"""
import subprocess, sys
import landlock.plumbing
import runtime.confine as confine
try:
    landlock.plumbing.landlock_abi_version()
except OSError as e:
    print("UNAVAILABLE", e)
    sys.exit(0)
landlock.plumbing.landlock_abi_version = lambda: 3  # a kernel before 6.7: no network rules
def no_libseccomp():
    raise RuntimeError("Unable to find libseccomp")
confine._pyseccomp = no_libseccomp
done = confine.confine_server([sys.argv[1]])
print("active", done.summary())
print("warning", done.warning("the server"))
""" + ATTEMPT + r"""
attempt("exec", lambda: subprocess.run(["/bin/true"], check=True))
attempt("write-outside", lambda: open(sys.argv[2], "w").write("x"))
for name, result in results.items():
    print(name, result)
"""


def test_a_missing_layer_is_said_in_one_line_and_the_others_hold(tmp_path):
    """Fail open: on a kernel before 6.7 and without libseccomp the server keeps its file
    confinement and says in one line what it runs without, and why."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    result = _run_probe(FAIL_OPEN_PROBE, model, tmp_path / "outside.txt")
    assert result["active"] == "files (Landlock)"
    assert result["warning"] == (
        "the server runs without confinement of programs and sockets (seccomp: RuntimeError: "
        "Unable to find libseccomp); network (Landlock: OSError: [Errno 95] Landlock ABI 3 "
        "has no network rules (Linux 6.7 or newer has them))")
    assert result["exec"] == "allowed" and result["write-outside"] == f"refused {EACCES}"


def _status(pid: int) -> str:
    return Path(f"/proc/{pid}/status").read_text()


def test_the_renderer_runs_confined():
    from runtime.chat import ChatTemplate
    from runtime.chat_worker import renderer

    assert ChatTemplate("{{ messages[0].content }}").render([{"role": "user", "content": "hi"}]) == "hi"
    if renderer().unconfined:
        pytest.skip(renderer().unconfined)
    assert "Seccomp:\t2" in _status(renderer()._process.pid)  # a filter is loaded


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
        assert "Seccomp:\t0" in _status(r._process.pid)
    finally:
        r.close()
        r.confine = True
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "--info"]).stdout
    assert re.search(r"confinement of the server and the chat template renderer: "
                     r"(files \(Landlock ABI \d+\)|nothing)", out), out
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "--info", "--unsecure"]).stdout
    assert "confinement of the server and the chat template renderer: off (--unsecure)" in out


# --- a real server ---------------------------------------------------------------------------

TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
    ["\u2581hi", "\u2581", "h", "i", "hi", "\u2581the", "a", "b"]
# renders plainly, except for a conversation whose last message is "bomb": then it spins
BOMB_TEMPLATE = ("{% if messages[-1].content == 'bomb' %}{% for i in range(100000) %}"
                 "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                 "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def bomb_model(tmp_path_factory) -> Path:
    """A tiny llama whose chat template spins on the message "bomb"."""
    path = tmp_path_factory.mktemp("confine") / "bomb.gguf"
    types = [2, 3, 3] + [6] * 256 + [1] * (len(TOKENS) - 259)
    write_synthetic_model_with_tokenizer(path, "llama", (TOKENS, [0.0] * len(TOKENS), types),
                                         seed=3, more=lambda w: w.add_chat_template(BOMB_TEMPLATE))
    return path


def _post(port: int, content: str) -> tuple[int, dict]:
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 2,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _children(pid: int) -> list[int]:
    """pid's child processes that are alive (a killed renderer stays a zombie until the
    launcher is asked for the next one: it reaps then)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in found if "State:\tZ" not in _status(c)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_confined_and_bomb(command: list, model: Path, tmp_path: Path, spawn) -> None:
    """Serve model with `command`; check that it says it is confined, that every one of its
    threads and its renderer run under a seccomp filter, that it answers, and that after a
    template overrun the renderer is replaced (by the launcher, not by the server) while
    /health answers within a second."""
    port = _free_port()
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = spawn([*command, "-m", model, "--port", port, "--nobrowser", "-c", "128"],
                     cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    wait_until_serving(proc, port, log=stderr_path.read_text)
    log = stderr_path.read_text()
    said = re.search(r"^confined: (.*)$", log, re.M)
    assert said, log
    if "warning: the server runs without" in log:
        pytest.skip(log)
    assert said.group(1) == ("programs and sockets (seccomp), files (Landlock), "
                             "network (Landlock)"), log
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        assert "Seccomp:\t2" in (task / "status").read_text(), (task, log)

    assert _post(port, "hi")[0] == 200
    [launcher] = _children(proc.pid)
    [first] = _children(launcher)
    answers = []
    thread = threading.Thread(target=lambda: answers.append(_post(port, "bomb")))
    thread.start()
    health_seconds = []
    while thread.is_alive() or not health_seconds:
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        health_seconds.append(time.perf_counter() - t0)
        time.sleep(0.05)
    thread.join()
    status, body = answers[0]
    assert status == 400 and "1 s limit" in body["error"]["message"], body
    assert max(health_seconds) < 1.0, health_seconds
    assert _post(port, "hi")[0] == 200  # rendered by a fresh renderer
    assert _children(proc.pid) == [launcher]
    [second] = _children(launcher)
    assert second != first and "Seccomp:\t2" in _status(second)
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    assert "Traceback" not in stderr_path.read_text(), stderr_path.read_text()


def test_a_confined_server_answers_and_replaces_an_overrun_renderer(bomb_model, tmp_path, spawn):
    serve_confined_and_bomb([sys.executable, "-m", "runtime"], bomb_model, tmp_path, spawn)


@pytest.fixture(scope="module")
def frozen_runtime(runtime_payload, tmp_path_factory) -> Path:
    """The frozen runtime of model.run, unpacked from the payload conftest builds."""
    folder = tmp_path_factory.mktemp("frozen")
    with tarfile.open(runtime_payload) as tar:
        tar.extractall(folder, filter="tar")
    return folder / "runtime" / "runtime"


def test_the_frozen_runtime_confines_itself_too(frozen_runtime, bomb_model, tmp_path, spawn):
    """model.run's runtime (PyInstaller) finds its own libseccomp and forks its renderers."""
    serve_confined_and_bomb([frozen_runtime], bomb_model, tmp_path, spawn)
