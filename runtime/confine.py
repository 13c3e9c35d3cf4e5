"""A process gives up what it will never need, through the kernel: Landlock (the `landlock`
package) for files, seccomp (libseccomp, through `pyseccomp`) for system calls.

Applied to the chat-template renderer (runtime.chat_worker), the process that runs a model
file's template code: once it has started, it cannot write, create or remove a file, run a
program, or open a network connection, whatever a hole in jinja2's sandbox let a template
do. It only reads its pipe and writes answers.

And to the serving process (runtime.cli's serve), files only: Landlock holds for the thread
that asks and the threads and processes it starts afterwards, so the main thread confines
itself before the HTTP threads and the engine thread exist. It may then read the model, the
runtime's and Python's own folders and the system's libraries and settings, and write only
in its cache folder (kernels, tokenizers) and /dev/shm (semaphores); every other file is
refused (PermissionError).

Both restrictions are irreversible and inherited. On a kernel without Landlock or seccomp,
or without libseccomp, the process runs without them: the confine_* functions say why, and
the caller warns once (fail open: the sandbox and the limits still hold).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable
from pathlib import Path

# What a confined renderer is refused (each answers EPERM): running programs, and any
# network or socket use (its pipes are already open).
DENIED_SYSCALLS = ("execve", "execveat", "socket", "socketpair", "connect", "bind", "listen",
                   "accept", "accept4", "ptrace", "process_vm_writev", "process_vm_readv")


def confine_renderer() -> str | None:
    """Restrict this process for good: read-only files, no programs, no sockets. None when
    both restrictions hold, else a sentence saying which could not be applied and why."""
    problems = []
    try:  # first: finding libseccomp may run ldconfig and write a temporary file
        _seccomp_deny(DENIED_SYSCALLS)
    except Exception as e:  # no seccomp, or no libseccomp on this machine
        problems.append(f"seccomp ({type(e).__name__}: {e})".replace("\n", " "))
    try:
        _landlock_read_only()
    except Exception as e:  # no Landlock in this kernel, or no such package
        problems.append(f"Landlock ({type(e).__name__}: {e})".replace("\n", " "))
    if problems:
        return "the chat template renderer runs without " + " and ".join(problems)
    return None


# What the serving process reads besides the model: the system's libraries, programs (the
# renderer is Python, started again) and settings (/etc: host names, time zone), what the
# kernel says about this process, the machine's memory and CPUs, and two devices.
SYSTEM_READ_FOLDERS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/proc",
                       "/sys/devices/system/cpu", "/sys/fs/cgroup")
SYSTEM_READ_FILES = ("/dev/null", "/dev/urandom", "/dev/random")
# Where POSIX semaphores live (a memory file system): Numba takes one when its threads start.
SYSTEM_WRITE_FOLDERS = ("/dev/shm",)


def confine_server(model_files: Iterable[str | Path]) -> str | None:
    """Restrict this thread, and every thread and process it starts from now on, to reading
    what a serving runtime needs and writing only in its cache folder. None when that holds,
    else a sentence saying why it could not be applied."""
    try:
        _landlock_serving([Path(f) for f in model_files], _serving_write_folders())
    except Exception as e:  # no Landlock in this kernel, or no such package
        text = f"{type(e).__name__}: {e}".replace("\n", " ")
        return f"the server runs without Landlock ({text})"
    return None


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


def availability() -> str:
    """What confine_renderer would apply on this machine, in a few words (for --info)."""
    found, missing = [], []
    try:
        from landlock import landlock_abi_version

        found.append(f"Landlock ABI {landlock_abi_version()}")
    except Exception as e:
        missing.append(f"Landlock ({type(e).__name__})")
    try:
        import pyseccomp

        pyseccomp.system_arch()  # loads libseccomp
        found.append("seccomp")
    except Exception as e:
        missing.append(f"seccomp ({type(e).__name__})")
    said = " and ".join(found) if found else "nothing"
    return said + (f"; not available: {', '.join(missing)}" if missing else "")


def _landlock_read_only() -> None:
    from landlock import FSAccess, Ruleset

    ruleset = Ruleset()  # every access right the kernel knows is handled: denied unless allowed
    ruleset.allow("/", rules=FSAccess.READ_FILE | FSAccess.READ_DIR)
    ruleset.apply()


def _seccomp_deny(names: tuple[str, ...]) -> None:
    import pyseccomp

    rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in names:
        rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    rules.load()
