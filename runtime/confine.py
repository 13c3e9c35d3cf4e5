"""A process gives up what it will never need, through the kernel: Landlock (the `landlock`
package) for files and the network, seccomp (libseccomp, through `pyseccomp`) for system
calls.

Applied to the chat-template renderer (runtime.chat_worker), the process that runs a model
file's template code: once it has started, it cannot write, create or remove a file, run a
program, open a socket or a TCP connection, or signal a process outside itself, whatever a
hole in jinja2's sandbox let a template do. It only reads its pipes and writes answers.

And to the serving process (runtime.cli's serve), once it has bound its port and started
the renderer's launcher, before its threads start (Landlock and seccomp hold for the thread
that asks and the threads and processes it starts afterwards):
- files (Landlock): it may read the model, the runtime's and Python's own folders and the
  system's libraries and settings, and write only in its cache folder and /dev/shm;
- network (Landlock ABI 4, Linux 6.7+): no TCP connection and no new TCP port; the
  listening socket, bound before, goes on accepting;
- programs and sockets (seccomp): no execve/execveat, no new socket of any family (UDP,
  Unix, netlink: every connection comes through the listening socket), no io_uring, no
  ptrace or reading/writing another process's memory. A renderer killed on overrun is replaced by a
  fork of the launcher (runtime.chat_worker), so the server never needs to run a program.

Why the network rules are written here and not by the `landlock` package: its version 1.0
knows only file rules (its ruleset attribute has no handled_access_net field). We reuse
its system-call wrappers (and their error explanations) with the kernel's longer attribute.

All restrictions are irreversible and inherited. On a kernel without one of them, or
without libseccomp, the process runs without that layer: the confine_* functions say which
and why, and the caller warns once (fail open: the others, the sandbox and the renderer's
limits still hold).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# What a confined renderer is refused (each answers EPERM): running programs, and any
# network or socket use (its pipes and its launcher's socket are already open).
RENDERER_DENIED_SYSCALLS = ("execve", "execveat", "socket", "socketpair", "connect", "bind",
                            "listen", "accept", "accept4", "ptrace", "process_vm_writev",
                            "process_vm_readv", "io_uring_setup")
# What the serving process is refused once serving: running programs, making sockets (it
# accepts on the one it listens on), and reaching into other processes. Both are refused
# io_uring too, whose operations (a socket, a connect) are not system calls seccomp sees.
SERVER_DENIED_SYSCALLS = ("execve", "execveat", "socket", "ptrace", "process_vm_writev",
                          "process_vm_readv", "io_uring_setup")

# Landlock's network rights and scopes (linux/landlock.h), and the ABI that brought them
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
NETWORK_ABI, SCOPE_ABI = 4, 6


@dataclass
class Confinement:
    """What a confine_* call applied (`active`: layers, each with its mechanism) and what
    it could not (`missing`: each with the reason)."""

    active: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def apply(self, layer: str, mechanism: str, act: Callable[[], object]) -> None:
        try:
            act()
            self.active.append(f"{layer} ({mechanism})")
        except Exception as e:  # not in this kernel, no such library: fail open
            text = f"{type(e).__name__}: {e}".replace("\n", " ")
            self.missing.append(f"{layer} ({mechanism}: {text})")

    def summary(self) -> str:
        """The layers in force, in a few words (the serve banner)."""
        return ", ".join(self.active) if self.active else "none"

    def warning(self, who: str) -> str | None:
        """One line naming what `who` runs without, or None when every layer holds."""
        if not self.missing:
            return None
        return f"{who} runs without confinement of " + "; ".join(self.missing)


FILES, NETWORK, CALLS = "files", "network", "programs and sockets"  # the layers, as said


def confine_renderer() -> Confinement:
    """Restrict this process for good: read-only files, no programs, no sockets, no TCP,
    no signals to processes outside it."""
    done = Confinement()
    # first: finding libseccomp may run ldconfig and write a temporary file
    done.apply(CALLS, "seccomp", lambda: _seccomp_deny(RENDERER_DENIED_SYSCALLS))
    done.apply(FILES, "Landlock", _landlock_read_only)
    done.apply(NETWORK, "Landlock", lambda: _landlock_network(SCOPE_ABSTRACT_UNIX_SOCKET
                                                              | SCOPE_SIGNAL))
    return done


# What the serving process reads besides the model: the system's libraries, programs and
# settings (/etc: host names, time zone), what the kernel says about this process, the
# machine's memory and CPUs, and two devices.
SYSTEM_READ_FOLDERS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/proc",
                       "/sys/devices/system/cpu", "/sys/fs/cgroup")
SYSTEM_READ_FILES = ("/dev/null", "/dev/urandom", "/dev/random")
# Where POSIX semaphores live (a memory file system): Numba takes one when its threads start.
SYSTEM_WRITE_FOLDERS = ("/dev/shm",)


def confine_server(model_files: Iterable[str | Path]) -> Confinement:
    """Restrict this thread, and every thread and process it starts from now on, to reading
    what a serving runtime needs, writing only in its cache folder, accepting on the sockets
    it already has, and running no program. Call it after binding the port and starting the
    renderer's launcher, before any other thread starts."""
    done = Confinement()
    done.apply(CALLS, "seccomp", lambda: _seccomp_deny(SERVER_DENIED_SYSCALLS))
    done.apply(FILES, "Landlock", lambda: _landlock_serving(
        [Path(f) for f in model_files], _serving_write_folders()))
    # abstract Unix sockets are scoped; signals are not: the server kills renderers that
    # overran, and they are not in its Landlock domain (the launcher started before it)
    done.apply(NETWORK, "Landlock", lambda: _landlock_network(SCOPE_ABSTRACT_UNIX_SOCKET))
    return done


def _serving_write_folders() -> list[Path]:
    """The user's cache folder (tokenizers; from a checkout, kernels) and, frozen, the
    kernel cache beside the executable (a kernel compiled on first use is kept there)."""
    from runtime import user_cache_home
    from runtime.kernels import cache_root

    folders = [user_cache_home(), cache_root()]
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # not writable anyway: leave it out
            pass
    return [f for f in folders if f.is_dir()] + [Path(f) for f in SYSTEM_WRITE_FOLDERS
                                                  if os.path.isdir(f)]


def _python_read_folders() -> list[Path]:
    """Python's and the runtime's own folders: the interpreter, its standard library and
    packages (modules still to be imported), the runtime package, the frozen build."""
    import runtime

    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix,
                  Path(os.path.realpath(sys.executable)).parent, Path(sys.executable).parent,
                  Path(runtime.__file__).resolve().parent.parent, *sys.path]
    return [Path(p).resolve() for p in candidates if p and Path(p).exists()]


def _landlock_serving(model_files: list[Path], write_folders: list[Path]) -> None:
    from landlock import FSAccess, Ruleset

    ruleset = Ruleset()  # every access right the kernel knows is handled: denied unless allowed
    known = ruleset.restrict_rules
    read = FSAccess.READ_FILE | FSAccess.READ_DIR
    run = FSAccess.READ_FILE | FSAccess.EXECUTE  # (a file rule takes file rights only)
    write = (read | FSAccess.WRITE_FILE | FSAccess.TRUNCATE | FSAccess.MAKE_REG
             | FSAccess.MAKE_DIR | FSAccess.REMOVE_FILE | FSAccess.REMOVE_DIR | FSAccess.REFER)
    for path in [*_python_read_folders(), *map(Path, SYSTEM_READ_FOLDERS)]:
        if path.exists():
            ruleset.allow(path, rules=(run | read if path.is_dir() else run) & known)
    for file in SYSTEM_READ_FILES:
        if os.path.exists(file):
            ruleset.allow(file, rules=(FSAccess.READ_FILE | FSAccess.WRITE_FILE) & known)
    for file in model_files:
        ruleset.allow(file, rules=FSAccess.READ_FILE)
    for folder in write_folders:
        ruleset.allow(folder, rules=write & known)
    ruleset.apply()


def _landlock_read_only() -> None:
    from landlock import FSAccess, Ruleset

    ruleset = Ruleset()  # every access right the kernel knows is handled: denied unless allowed
    ruleset.allow("/", rules=FSAccess.READ_FILE | FSAccess.READ_DIR)
    ruleset.apply()


class _NetworkRulesetAttr(ctypes.Structure):
    """struct landlock_ruleset_attr as of ABI 6; the kernel reads the first `size` bytes."""

    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


def _landlock_network(scoped: int) -> None:
    """A Landlock layer that handles TCP bind and connect and allows neither (sockets bound
    or connected before keep working), and, from ABI 6, the given scopes."""
    from landlock.plumbing import (PR_SET_NO_NEW_PRIVS, RulesetAttr, get_create_ruleset,
                                   get_prctl, get_restrict_self, landlock_abi_version)

    abi = landlock_abi_version()
    if abi < NETWORK_ABI:
        raise OSError(errno.EOPNOTSUPP, f"Landlock ABI {abi} has no network rules "
                                        "(Linux 6.7 or newer has them)")
    attr = _NetworkRulesetAttr(0, NET_BIND_TCP | NET_CONNECT_TCP, scoped)
    size = ctypes.sizeof(attr) if abi >= SCOPE_ABI else _NetworkRulesetAttr.scoped.offset
    as_theirs = ctypes.cast(ctypes.pointer(attr), ctypes.POINTER(RulesetAttr))
    ruleset = get_create_ruleset()(as_theirs, size, 0)
    try:
        get_prctl()(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        get_restrict_self()(ruleset, 0)
    finally:
        os.close(ruleset)


def _seccomp_deny(names: tuple[str, ...]) -> None:
    seccomp = _pyseccomp()
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in names:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
    rules.load()


def _pyseccomp():
    """pyseccomp, on the libseccomp that model.run ships when frozen. PyInstaller puts the
    library beside the runtime, but pyseccomp finds it through ctypes.util.find_library,
    which on Linux reads only the system's ldconfig cache: a machine without libseccomp
    would go without seccomp though the runtime carries it."""
    import ctypes.util

    bundled = Path(getattr(sys, "_MEIPASS", "")) / "libseccomp.so.2"
    if "pyseccomp" in sys.modules or not getattr(sys, "frozen", False) or not bundled.is_file():
        import pyseccomp

        return pyseccomp
    find = ctypes.util.find_library
    ctypes.util.find_library = lambda name: str(bundled) if name == "seccomp" else find(name)
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = find
    return pyseccomp


def availability() -> str:
    """The layers confine_server and confine_renderer would apply on this machine, and
    those they could not, in a few words (for --info)."""
    found, missing = [], []
    try:
        from landlock import landlock_abi_version

        abi = landlock_abi_version()
        found.append(f"{FILES} (Landlock ABI {abi})")
        if abi >= NETWORK_ABI:
            found.append(f"{NETWORK} (Landlock)")
        else:
            missing.append(f"{NETWORK} (Landlock ABI {abi} has no network rules: Linux 6.7+)")
    except Exception as e:
        missing.append(f"{FILES} and {NETWORK} (Landlock: {type(e).__name__})")
    try:
        _pyseccomp().system_arch()  # loads libseccomp
        found.append(f"{CALLS} (seccomp)")
    except Exception as e:
        missing.append(f"{CALLS} (seccomp: {type(e).__name__})")
    said = ", ".join(found) if found else "nothing"
    return said + (f"; not available: {', '.join(missing)}" if missing else "")
