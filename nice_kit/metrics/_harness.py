"""The trusted test harness that :mod:`nice_kit.metrics.code` runs inside the sandbox (process H).

:mod:`nice_kit.metrics.code` passes this file's source to
:func:`nice_kit.metrics.sandbox.run_untrusted` as the script to run, with the payload (JSON:
``program``, ``units`` ([source, counted] pairs), ``entry_point``, ``bind_candidate``) on stdin and
the report channel on file descriptor 3. It uses the standard library only (it may run on a system
``python3``); importing it does nothing.

Before it reads anything it makes itself non-dumpable (a process of the same uid can then neither
ptrace it nor open /proc/<H>/fd or mem) and forks the candidate process C, which closes the report
channel (fd 3) and the payload pipe (stdin) before it receives the program. C loads the program and
answers H's requests (call this object, get that attribute, iterate ...) over two pipes, with
values in a tagged JSON that decodes only to builtin literals (None, bool, int, float, str, bytes,
complex, list, tuple, set, dict) or to opaque handles on C's objects. H runs the tests in its own
interpreter and writes each verdict to fd 3 (``<index> pass|fail``, ``note <text>``), which only H
holds. Whatever C's code does (walk frames, patch builtins, print, exit, return objects with a
lying __eq__) it changes only the answers C gives, never H's verdict.
"""

import builtins as _builtins, json as _json, os as _os, signal as _signal, struct as _struct, sys as _sys

_REPORT = 3
_MAX_MESSAGE = 32 * 1024 * 1024
_MAX_DEPTH = 100
_EXCEPTIONS = {k: v for k, v in vars(_builtins).items() if isinstance(v, type) and issubclass(v, Exception)}


def _send(fd, obj):
    data = _json.dumps(obj).encode("utf-8")
    view = memoryview(_struct.pack(">I", len(data)) + data)
    while view:
        view = view[_os.write(fd, view):]


def _read(fd, n):
    parts = []
    while n:
        chunk = _os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the pipe")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _recv(fd):
    (n,) = _struct.unpack(">I", _read(fd, 4))
    if n > _MAX_MESSAGE:
        raise ValueError("message of %d bytes" % n)
    return _json.loads(_read(fd, n).decode("utf-8"))


def _encode(v, handle, depth=0):
    # builtin literals as JSON (containers tagged), anything else as handle(v)
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(v)
    if v is None or t is bool or t is int or t is str or t is float:
        return v
    if isinstance(v, bool):
        return bool(v)
    if getattr(t, "__module__", "") == "numpy" and hasattr(v, "tolist"):
        return _encode(v.tolist(), handle, depth + 1)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, (bytes, bytearray)):
        return {"B": bytes(v).hex()}
    if isinstance(v, complex):
        return {"C": [v.real, v.imag]}
    for cls, tag in ((list, "L"), (tuple, "T"), (frozenset, "F"), (set, "S")):
        if isinstance(v, cls):
            return {tag: [_encode(x, handle, depth + 1) for x in v]}
    if isinstance(v, dict):
        return {"D": [[_encode(k, handle, depth + 1), _encode(x, handle, depth + 1)] for k, x in v.items()]}
    return handle(v)


def _decode(x, handle, depth=0):
    # the inverse of _encode, strict: builtin types only, handles through handle(message)
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(x)
    if x is None or t is bool or t is int or t is str or t is float:
        return x
    if t is not dict or len(x) not in (1, 2):
        raise ValueError("not a value")
    if "H" in x or "M" in x:
        return handle(x)
    if len(x) != 1:
        raise ValueError("not a value")
    (tag, body), = x.items()
    if tag == "B" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError("not a value")
    if tag == "C" and len(body) == 2 and all(type(b) in (int, float) for b in body):
        return complex(body[0], body[1])
    if tag == "D":
        if not all(type(i) is list and len(i) == 2 for i in body):
            raise ValueError("not a value")
        return dict((_decode(k, handle, depth + 1), _decode(v, handle, depth + 1)) for k, v in body)
    items = [_decode(i, handle, depth + 1) for i in body]
    if tag == "L":
        return items
    if tag == "T":
        return tuple(items)
    if tag == "S":
        return set(items)
    if tag == "F":
        return frozenset(items)
    raise ValueError("not a value")


def _candidate(rfd, wfd):
    # Process C: loads the program and answers requests. Untrusted from the moment it runs exec.
    objects = []

    def keep(v):
        if isinstance(v, type(_sys)) and _sys.modules.get(getattr(v, "__name__", None)) is v:
            return {"M": v.__name__}
        objects.append(v)
        return {"H": len(objects) - 1, "c": callable(v)}

    def resolve(msg):
        if type(msg.get("H")) is not int or not 0 <= msg["H"] < len(objects):
            raise ValueError("unknown handle")
        return objects[msg["H"]]

    program = _recv(rfd)
    namespace = {"__name__": "__nice_solution__", "__builtins__": _builtins}
    try:
        exec(compile(program, "<solution>", "exec"), namespace)
    except BaseException:
        import traceback
        traceback.print_exc()
        _send(wfd, {"loaded": False})
        return
    names = {}
    for name, value in list(namespace.items()):
        if not name.startswith("__"):
            try:
                names[name] = _encode(value, keep)
            except Exception:
                pass
    _send(wfd, {"loaded": True, "names": names})
    while True:
        try:
            msg = _recv(rfd)
        except EOFError:
            return
        try:
            op, obj = msg[0], resolve({"H": msg[1]})
            if op == "call":
                args = [_decode(a, resolve) for a in msg[2]]
                kwargs = {k: _decode(a, resolve) for k, a in msg[3]}
                result = obj(*args, **kwargs)
            elif op == "getattr":
                result = getattr(obj, msg[2])
            elif op == "iter":
                result = iter(obj)
            elif op == "next":
                result = next(obj)
            elif op == "len":
                result = len(obj)
            elif op == "getitem":
                result = obj[_decode(msg[2], resolve)]
            elif op == "contains":
                result = _decode(msg[2], resolve) in obj
            elif op == "bool":
                result = bool(obj)
            else:
                raise ValueError("unknown request")
            reply = {"ok": _encode(result, keep)}
        except BaseException as e:
            try:
                text = str(e)[:2000]
            except BaseException:
                text = ""
            reply = {"err": [type(e).__name__, text]}
        _send(wfd, reply)


class _CandidateError(Exception):
    pass


class _Link:
    # H's end of the pipes to C. Any failure of C (gone, garbled) fails this and every later call.
    def __init__(self, rfd, wfd):
        self.rfd, self.wfd, self.broken = rfd, wfd, None

    def ask(self, msg):
        if self.broken:
            raise _CandidateError(self.broken)
        try:
            _send(self.wfd, msg)
            reply = _recv(self.rfd)
        except (OSError, EOFError, ValueError, RecursionError, MemoryError, _struct.error) as e:
            self.broken = "the candidate process ended or broke the protocol (%s)" % type(e).__name__
            raise _CandidateError(self.broken)
        if type(reply) is dict and "ok" in reply:
            try:
                return _decode(reply["ok"], _remote)
            except (ValueError, TypeError, RecursionError):
                raise _CandidateError("the candidate returned something that is not a value")
        if type(reply) is dict and type(reply.get("err")) is list and len(reply["err"]) == 2:
            name, text = reply["err"]
            cls = _EXCEPTIONS.get(name) if type(name) is str else None
            try:
                error = cls(str(text)) if cls is not None else None
            except Exception:
                error = None
            raise error if error is not None else _CandidateError("%s: %s" % (name, text))
        raise _CandidateError("the candidate process broke the protocol")


_link = None


class _Remote:
    # An object that lives in C. Calls, attributes, iteration, len, [], `in` and truth go to C;
    # == and hash stay local (identity), so C cannot answer "equal to anything".
    __slots__ = ("_nice_id",)

    def __init__(self, i):
        object.__setattr__(self, "_nice_id", i)

    def __call__(self, *args, **kwargs):
        return _link.ask(["call", self._nice_id, [_encode(a, _handle_arg) for a in args],
                          [[k, _encode(v, _handle_arg)] for k, v in kwargs.items()]])

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _link.ask(["getattr", self._nice_id, name])

    def __iter__(self):
        return _link.ask(["iter", self._nice_id])

    def __next__(self):
        return _link.ask(["next", self._nice_id])

    def __len__(self):
        return _link.ask(["len", self._nice_id])

    def __getitem__(self, key):
        return _link.ask(["getitem", self._nice_id, _encode(key, _handle_arg)])

    def __contains__(self, item):
        return _link.ask(["contains", self._nice_id, _encode(item, _handle_arg)]) is True

    def __bool__(self):
        return _link.ask(["bool", self._nice_id]) is True

    def __repr__(self):
        return "<candidate object %d>" % self._nice_id


def _remote(msg):
    if type(msg.get("H")) is int:
        return _Remote(msg["H"])
    if type(msg.get("M")) is str:
        import importlib
        return importlib.import_module(msg["M"])
    raise ValueError("not a value")


def _handle_arg(v):
    if type(v) is _Remote:
        return {"H": v._nice_id}
    raise TypeError("cannot pass a %s to the candidate" % type(v).__name__)


def _nice_harness():
    global _link
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    if _sys.platform.startswith("linux"):
        import ctypes
        if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0
            raise SystemExit("could not make the harness non-dumpable")
    req_r, req_w = _os.pipe()
    rep_r, rep_w = _os.pipe()
    pid = _os.fork()
    if pid == 0:
        try:
            for fd in (_REPORT, 0, req_w, rep_r):
                _os.close(fd)
            _candidate(req_r, rep_w)
        finally:
            _os._exit(0)
    _os.close(req_r)
    _os.close(rep_w)

    def write(line):
        _os.write(_REPORT, (line + "\n").encode("utf-8", "replace"))

    payload = _json.loads(_sys.stdin.buffer.read().decode("utf-8"))
    units, counted = [], 0
    for source, is_test in payload["units"]:
        try:
            code = compile(source, "<test %d>" % counted if is_test else "<test setup>", "exec")
        except SyntaxError:
            code = None
        units.append((code, counted if is_test else None))
        counted += bool(is_test)
    entry_point = payload["entry_point"]
    _link = _Link(rep_r, req_w)
    scope = {"__name__": "__nice_tests__", "__builtins__": _builtins}
    loaded = False
    try:
        _send(req_w, payload["program"])
        hello = _recv(rep_r)
        loaded = type(hello) is dict and hello.get("loaded") is True and type(hello.get("names")) is dict
    except (OSError, EOFError, ValueError, RecursionError, MemoryError, _struct.error):
        hello = None
    if loaded:
        for name, value in hello["names"].items():
            try:
                scope[name] = _decode(value, _remote)
            except Exception:
                pass
        if entry_point and entry_point not in scope:
            write("note entry point %r is not defined" % entry_point)
            loaded = False
        elif payload["bind_candidate"]:
            scope["candidate"] = scope[entry_point]
    else:
        write("note the program did not load")
    for code, index in units:
        passed = False
        if loaded and code is not None:
            try:
                exec(code, scope)
                passed = True
            except BaseException:
                passed = False
        if index is not None:
            write("%d %s" % (index, "pass" if passed else "fail"))
    if _link.broken:
        write("note " + _link.broken)
    _sys.stdout.flush()
    _sys.stderr.flush()
    _os._exit(0)  # no interpreter shutdown: the verdicts are written


if __name__ == "__main__":
    _nice_harness()
