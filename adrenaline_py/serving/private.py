"""Keep what tritonserver holds private to the server's user: its files and its API key.

tritonserver 2.51 has no option for either, so the launcher works around it in the child process
it starts (Linux only; each step falls back, and says so, where the kernel refuses it):

* Files: the process starts with umask 077, and a seccomp filter turns every chmod that would
  grant group or other access into a no-op that reports success. The python backend creates each
  stub's shared-memory region (``/dev/shm/triton_*_shm_region_*``, where requests and responses
  pass, prompts included) with ``open(..., 0644)`` and then ``fchmod(fd, 0644)`` to undo the
  umask (boost.interprocess); with the filter it stays 0600 from its creation, so no other user
  can open it even for an instant. The filter is inherited by the stubs and their workers.
* The API key: tritonserver takes it only on its command line (``--http-restricted-api``,
  ``--grpc-restricted-protocol``: ``apis:header=key``), which any local user can read in
  ``/proc/PID/cmdline`` (``ps``). The launcher passes a placeholder there and the real argument
  in the environment (``/proc/PID/environ`` is readable by the same user only). The child stops
  at its exec (``PTRACE_TRACEME``); before tritonserver's ``main`` runs, the launcher points those
  ``argv[i]`` at the environment strings (``/proc/PID/mem``) and lets it go. The command line then
  shows the placeholder, and tritonserver parses the real argument.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

#: environment variables carrying hidden arguments, ``<prefix><argv index>``
SECRET_ARG_ENV_PREFIX = "ADRENALINE_TRITON_ARG_"
HIDDEN = "<hidden: the run's api_key file>"

_PR_SET_PDEATHSIG = 1
_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2
_PTRACE_TRACEME = 0
_PTRACE_DETACH = 17

# classic BPF
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_ARCH_X86_64, _ARCH_AARCH64 = 0xC000003E, 0xC00000B7
# (audit arch, {syscall number: index of its mode argument}) of chmod, fchmod, fchmodat, fchmodat2
_CHMODS = {"x86_64": (_ARCH_X86_64, {90: 1, 91: 1, 268: 2, 452: 2}),
           "aarch64": (_ARCH_AARCH64, {52: 1, 53: 2, 452: 2})}


def _chmod_filter(arch: int, mode_arg: dict[int, int]) -> bytes:
    """BPF: a chmod family call whose mode has any of the 077 bits returns 0 without running."""
    code: list[tuple[int, int, int, int]] = []  # (op, jt, jf, k); jumps patched below
    code.append((_LD_W_ABS, 0, 0, 4))  # seccomp_data.arch
    code.append((_JEQ_K, 0, 0, arch))  # -> syscall checks, else allow
    code.append((_LD_W_ABS, 0, 0, 0))  # seccomp_data.nr
    nrs = list(mode_arg.items())
    first_check = len(code)
    code += [(_JEQ_K, 0, 0, nr) for nr, _ in nrs]
    allow_1 = len(code)
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    mode_at: dict[int, int] = {}
    for arg in sorted(set(mode_arg.values())):
        mode_at[arg] = len(code)
        code.append((_LD_W_ABS, 0, 0, 16 + 8 * arg))  # low 32 bits of args[arg] (little endian)
        code.append((_JSET_K, 0, 0, 0o077))
    fake = len(code)
    code.append((_RET_K, 0, 0, _RET_ERRNO | 0))
    allow = len(code)
    code.append((_RET_K, 0, 0, _RET_ALLOW))

    def rel(src: int, dst: int) -> int:
        return dst - src - 1

    code[1] = (_JEQ_K, 0, rel(1, allow_1), arch)
    for i, (nr, arg) in enumerate(nrs):
        at = first_check + i
        code[at] = (_JEQ_K, rel(at, mode_at[arg]), 0, nr)
    for at in mode_at.values():
        code[at + 1] = (_JSET_K, rel(at + 1, fake), rel(at + 1, allow), 0o077)
    return b"".join(struct.pack("HBBI", *c) for c in code)


def child_setup(umask: int | None = 0o077, private_chmod: bool = True, die_with_parent: bool = False,
                stop_at_exec: bool = False) -> Callable[[], None] | None:
    """A ``preexec_fn`` for tritonserver (everything resolved here, before the fork).

    ``stop_at_exec`` (for `hide_args`) raises in the child when ptrace is refused, so that Popen
    fails and the caller can start again without hidden arguments.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl, ptrace = libc.prctl, libc.ptrace
    except (OSError, AttributeError):
        return (lambda: os.umask(umask)) if umask is not None else None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    prog = None
    arch = _CHMODS.get(platform.machine())
    if private_chmod and arch is not None:
        raw = _chmod_filter(*arch)
        buf = ctypes.create_string_buffer(raw, len(raw))
        fprog = struct.pack("HxxxxxxQ", len(raw) // 8, ctypes.addressof(buf))  # struct sock_fprog
        prog = (buf, ctypes.create_string_buffer(fprog, len(fprog)))

    def setup() -> None:
        if umask is not None:
            os.umask(umask)
        if die_with_parent:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if prog is not None and prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
            prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog[1]), 0, 0)  # best effort
        if stop_at_exec and ptrace(_PTRACE_TRACEME, 0, None, None) != 0:
            raise OSError(ctypes.get_errno(), "PTRACE_TRACEME refused")

    return setup


def split_secret_args(cmd: Sequence[str], secret: str) -> tuple[list[str], dict[str, str]]:
    """(command line with each argument holding ``secret`` replaced by a placeholder, the
    environment variables that carry the real arguments)."""
    shown, env = [], {}
    for i, arg in enumerate(cmd):
        if secret and secret in arg:
            flag = arg.split("=", 1)[0]
            shown.append(f"{flag}={HIDDEN}")
            env[f"{SECRET_ARG_ENV_PREFIX}{i}"] = arg
        else:
            shown.append(arg)
    return shown, env


def hide_args(pid: int, names: Sequence[str]) -> None:
    """Point ``argv[i]`` of the exec-stopped, traced child ``pid`` at the value of the environment
    variable ``<prefix>i`` (for each name in ``names``), then let it run. Raises OSError when the
    child cannot be rewritten; the caller must then kill it (it still holds placeholders)."""
    _, status = os.waitpid(pid, 0)
    if not os.WIFSTOPPED(status):
        raise OSError(f"the child did not stop at its exec (status {status})")
    stat = Path(f"/proc/{pid}/stat").read_text()
    sp = int(stat[stat.rindex(")") + 2:].split()[25])  # field 28, startstack: where argc is
    word = struct.Struct("<Q")
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(sp)
        argc = word.unpack(mem.read(8))[0]
        values: dict[int, int] = {}  # argv index -> address of the real argument
        envp = sp + 8 * (argc + 2)
        for k in range(4096):
            mem.seek(envp + 8 * k)
            ptr = word.unpack(mem.read(8))[0]
            if ptr == 0:
                break
            mem.seek(ptr)
            head = mem.read(len(SECRET_ARG_ENV_PREFIX) + 12)  # only names matter: values may be long
            name, eq, _ = head.partition(b"=")
            if eq and name.decode(errors="replace") in names:
                values[int(name[len(SECRET_ARG_ENV_PREFIX):])] = ptr + len(name) + 1
        if set(values) != {int(n[len(SECRET_ARG_ENV_PREFIX):]) for n in names}:
            raise OSError("hidden arguments not found in the child's environment")
        for index, addr in values.items():
            if not 0 < index < argc:
                raise OSError(f"argument {index} out of range (argc {argc})")
            mem.seek(sp + 8 * (1 + index))
            mem.write(word.pack(addr))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(_PTRACE_DETACH, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), "PTRACE_DETACH failed")


def drop_secret_env(environ: dict | None = None) -> None:
    """Remove the hidden arguments from a process's environment (stubs: their workers need none)."""
    environ = os.environ if environ is None else environ
    for name in [n for n in environ if n.startswith(SECRET_ARG_ENV_PREFIX)]:
        del environ[name]
