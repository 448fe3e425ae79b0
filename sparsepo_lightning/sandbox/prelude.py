"""The in-process guard: Python source run by the sandboxed interpreter before the user's program (second layer)."""

# The prelude runs in the child before the user's program. It reads "<nonce>\n<program>" from stdin, installs
# the guard, executes the program in a fresh namespace and, last, writes "<nonce> <status>" on its own line.
PRELUDE = r"""
def _sandbox_main():
    import sys
    nonce = sys.stdin.readline().strip()
    source = sys.stdin.read()
    import builtins, faulthandler, io, linecache, os, posix, shutil, socket, subprocess, traceback
    import _io, _posixsubprocess, _socket

    root = os.path.realpath(os.getcwd())
    own_pid = str(os.getpid())

    def deny(name):
        def denied(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return denied

    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def check(path, write):
        if write and not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is disabled: {path!r}")
        if not isinstance(path, int):  # other processes' /proc entries (environ, cmdline, mem) are off limits
            parts = os.path.realpath(os.fsdecode(path)).split(os.sep)
            if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != own_pid:
                raise PermissionError(f"sandbox: reading other processes' /proc entries is disabled: {path!r}")

    real_open, real_os_open, real_mkdir, real_fileio = _io.open, posix.open, posix.mkdir, _io.FileIO
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        check(path, bool(flags & write_flags))
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        check(path, True)
        return real_mkdir(path, *args, **kwargs)

    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            check(file, any(c in mode for c in "wax+"))
            super().__init__(file, mode, *args, **kwargs)

    def guard_paths(name, real, n_paths):
        def guarded(*args, **kwargs):
            for path in args[:n_paths]:
                check(path, True)
            return real(*args, **kwargs)
        guarded.__name__ = name
        return guarded

    for name, n_paths in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("truncate", 1), ("rename", 2),
                          ("replace", 2)):
        guarded = guard_paths(name, getattr(posix, name), n_paths)
        setattr(os, name, guarded)
        setattr(posix, name, guarded)
    builtins.open = io.open = _io.open = guarded_open
    os.open = posix.open = guarded_os_open
    os.mkdir = posix.mkdir = guarded_mkdir
    io.FileIO = _io.FileIO = GuardedFileIO

    for module in (os, posix):
        for name in (
            "_exit", "kill", "killpg", "system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl",
            "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
            "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "putenv", "unsetenv",
            "removedirs", "renames", "chmod",
            "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "setuid", "seteuid",
            "setgid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "link", "symlink",
            "mkfifo", "mknod", "pidfd_open", "plock",
        ):
            if hasattr(module, name):
                setattr(module, name, deny(f"{module.__name__}.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, deny(f"shutil.{name}"))
    subprocess.Popen = deny("subprocess.Popen")
    _posixsubprocess.fork_exec = deny("_posixsubprocess.fork_exec")
    class GuardedRawSocket(_socket.socket):  # what `_socket.socket(...)` creates from now on
        pass

    for name in ("connect", "connect_ex", "bind", "listen", "sendto", "sendmsg"):
        setattr(socket.socket, name, deny(f"socket.{name}"))
        setattr(GuardedRawSocket, name, deny(f"socket.{name}"))
    _socket.socket = GuardedRawSocket  # socket.socket subclasses the original type and is guarded itself
    for module in (socket, _socket):
        for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                     "gethostbyaddr", "getnameinfo"):
            if hasattr(module, name):
                setattr(module, name, deny(f"socket.{name}"))
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, deny(name))
    for name in ("ctypes", "_ctypes", "resource", "psutil", "ipdb", "joblib", "tkinter", "multiprocessing"):
        sys.modules[name] = None  # import raises ImportError
    faulthandler.disable()

    def report(e):  # the traceback without this prelude's own frame
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)

    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    status = "error"
    try:
        code = compile(source, "<program>", "exec")
        del source
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
        status = "passed"
    except AssertionError as e:
        status = "failed"
        report(e)
    except MemoryError:
        status = "memory"
        sys.stderr.write("MemoryError\n")
    except SystemExit as e:
        sys.stderr.write(f"sandbox: the program called exit({e.code!r}) before its tests finished\n")
    except BaseException as e:
        report(e)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    posix.write(1, f"\n{nonce} {status}\n".encode())


_sandbox_main()
"""
