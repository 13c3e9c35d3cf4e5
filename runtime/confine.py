"""A process gives up what it will never need, through the kernel: Landlock (the `landlock`
package) for files, seccomp (libseccomp, through `pyseccomp`) for system calls.

Applied to the chat-template renderer (runtime.chat_worker), the process that runs a model
file's template code: once it has started, it cannot write, create or remove a file, run a
program, or open a network connection, whatever a hole in jinja2's sandbox let a template
do. It only reads its pipe and writes answers.

Both restrictions are irreversible and inherited, and hold for the calling thread (the
renderer has one). On a kernel without Landlock or seccomp, or without libseccomp, the
renderer runs without them: confine_renderer says why, and the caller warns once (fail
open: the sandbox and the limits still hold). The server process itself is not confined
yet: Landlock restricts only the thread that asks, and the server runs many.
"""

from __future__ import annotations

import errno

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
