"""Rule-based rewards of DeepSeek-R1 (section 2.2.2), safe to run on untrusted model output.

R1 rewards reasoning with rules, not a neural reward model: accuracy (the final answer checked by
rules; code run against tests), format (<think> then <answer>), and in the second RL stage language
consistency (share of chain-of-thought words in the target language). DAPO's soft overlong
penalty and a combiner that logs every component complete the set.
Safety choices (each reward takes (completion, problem), never raises, returns a finite float):
- model text never reaches eval, sympify or parse_expr. A whitelisting parser builds a small AST
  with bounds on length, tokens, nesting, exponents and factorials. Rational answers compare
  exactly in-process (Fraction: 0.333 is not 1/3), rational functions by exact evaluation at
  random points; only answers with radicals, pi, e, i or functions go to sympy, in a worker
  process killed when the time limit passes (no signals: it works on any thread).
- code runs in a child process: fresh network, mount and pid namespaces, a read-only file system
  with a private tmpfs as the only writable place, a uid of its own, rlimits, an empty environment
  and a capped output. `sandbox_layers()` reports which layers this machine provides.
"""

from __future__ import annotations

import ast
import atexit
import cmath
import json
import math
import os
import pickle
import random
import re
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Callable

from tasks import Problem, last_boxed, match_brace

MAX_ANSWER_CHARS = 1000  # longer answers are wrong without being read
MAX_TOKENS = 400
MAX_DEPTH = 100  # parser recursion, about two levels per bracket
MAX_EXPONENT = 1024  # |n| in x^n when n is a number
MAX_BITS = 16384  # size of any exact intermediate number
MAX_FACTORIAL = 1000
MAX_ITEMS = 32  # elements of a tuple, set or list
DEFAULT_TIMEOUT = 2.0  # seconds per math_equal call
SYMPY_WORKERS = max(2, min(8, os.cpu_count() or 2))  # concurrent sympy comparisons
SYMPY_STARTUP_TIMEOUT = 60.0  # a cold worker imports sympy; not charged to the call's limit


class _Reject(Exception):
    """The answer is outside what we read (syntax, size, nesting): it is wrong."""


class _NotRational(Exception):
    """Exact rational evaluation is impossible (pi, sqrt, x^(1/2)): needs the symbolic path."""


class _Timeout(Exception):
    pass


# Answer extraction -----------------------------------------------------------------------------


def extract_answer(text) -> str | None:
    """The last <answer>...</answer>, else the last \\boxed{...}; None when there is neither."""
    if not isinstance(text, str):
        return None
    end = text.rfind("</answer>")
    if end >= 0:
        start = text.rfind("<answer>", 0, end)
        if start >= 0:
            return text[start + len("<answer>"):end].strip()
    boxed = last_boxed(text)
    return None if boxed is None else boxed.strip()


# Normalisation: string surgery only; meaning comes from the parser ------------------------------

_UNICODE = {"−": "-", "–": "-", "×": "\\times ", "÷": "\\div ", "·": "\\cdot ", "π": "\\pi ",
            "∞": "\\infty ", "√": "\\sqrt ", "∪": "\\cup ", "±": "\\pm ", "∅": "\\emptyset "}
_SIZING_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?![a-zA-Z])\.?")
_DROP_RE = re.compile(r"\\(?:displaystyle|textstyle|limits|mathbb)(?![a-zA-Z])|\\[!]")
_SPACING_RE = re.compile(r"\\(?:[,;: ]|quad|qquad)(?![a-zA-Z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°")
_TEXT_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mathsf|mbox|hbox)\s*\{")
# a unit written as trailing text after a number: 5\text{ cm} -> 5
_UNIT_RE = re.compile(r"(?<=[\d}).])\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}"
                      r"(?:\s*\^\s*\{?\d\}?)?\s*$")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?")
_PLAIN_NUMBER_RE = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")


def _normalize(s: str) -> str | None:
    s = s.strip()
    if "\\boxed" in s or "\\fbox" in s:
        inner = last_boxed(s)
        if inner is None:
            return None
        s = inner.strip()
    if not s.isascii():
        for a, b in _UNICODE.items():
            s = s.replace(a, b)
    s = s.replace("\\$", "").replace("$", "")
    s = _SIZING_RE.sub("", s)
    for delim in ("\\(", "\\)", "\\[", "\\]"):
        s = s.replace(delim, "")
    s = s.replace("{,}", "")  # LaTeX thousands: 1{,}000
    s = re.sub(r"(?<=\d)\\,(?=\d{3}(?!\d))", "", s)  # and 1\,000
    s = _DROP_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREE_RE.sub("", s).replace("\\%", "%")
    s = _UNIT_RE.sub("", s)
    for _ in range(20):  # \text{...} -> its content
        m = _TEXT_RE.search(s)
        if m is None:
            break
        close = match_brace(s, m.end() - 1)
        if close < 0:
            return None
        s = s[:m.start()] + s[m.end():close] + s[close + 1:]
    s = " ".join(s.split())
    if s.endswith(".") and not s.endswith(".."):  # a sentence's full stop
        s = s[:-1].rstrip()
    if _THOUSANDS_RE.fullmatch(s):  # 1,000 is 1000; (1,000) stays a pair
        s = s.replace(",", "")
    return s


# Tokenizer and parser: a whitelist, so anything else is simply not an answer --------------------

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<cmd>\\(?:[a-zA-Z]+|[{}]))"
    r"|(?P<word>[a-zA-Z]+)"
    r"|(?P<op>\*\*|[-+*/^()\[\]{},=!%_]))")
_FUNCS = ("sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan",
          "sinh", "cosh", "tanh", "ln", "log", "exp", "abs")
_GREEK = ("alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
          "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau",
          "upsilon", "phi", "varphi", "chi", "psi", "omega")
_COMMANDS = {"frac": ("frac", ""), "pi": ("const", "pi"), "infty": ("const", "oo"),
             "cdot": ("op", "*"), "times": ("op", "*"), "div": ("op", "/"), "pm": ("op", "pm"),
             "cup": ("op", "cup"), "{": ("op", "\\{"), "}": ("op", "\\}"),
             "emptyset": ("empty", ""), "varnothing": ("empty", ""),
             **{f: ("func", f) for f in _FUNCS}, **{g: ("name", g) for g in _GREEK}}
_WORDS = {"pi": ("const", "pi"), "oo": ("const", "oo"), "inf": ("const", "oo"),
          "infinity": ("const", "oo"), **{f: ("func", f) for f in _FUNCS}}
_EXPONENT_RE = re.compile(r"[eE]([+-]?\d+)$")


def _tokenize(s: str) -> list[tuple[str, str]]:
    toks, pos = [], 0
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if m is None:
            if s[pos:].isspace():
                break
            raise _Reject(f"unexpected character {s[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        text = m.group(kind)
        if kind == "num":
            toks.append(("num", text))
        elif kind == "cmd":
            if text[1:] not in _COMMANDS:
                raise _Reject(f"unsupported command {text}")
            toks.append(_COMMANDS[text[1:]])
        elif kind == "word":
            if text in _WORDS:
                toks.append(_WORDS[text])
            else:  # xy is x times y
                toks.extend(("name", ch) for ch in text)
        else:
            toks.append(("op", "^" if text == "**" else text))
        if len(toks) > MAX_TOKENS:
            raise _Reject("too many tokens")
    return toks


def _number(text: str) -> Fraction:
    m = _EXPONENT_RE.search(text)
    if m and abs(int(m.group(1))) > MAX_EXPONENT:
        raise _Reject("exponent too large")
    return Fraction(text)  # exact: Fraction("0.333") is 333/1000


# AST nodes are tuples, hashable so that results can be cached:
#   ("num", Fraction)  ("sym", name)  ("const", "pi" | "E" | "I" | "oo")
#   (op, a, b) for op in + - * / ^ pm     ("neg", a)  ("!", a)  ("%", a)
#   ("func", name, a)  ("root", n, a)  ("logb", base, a)  ("eq", lhs, rhs)
#   ("seq", open, close, items): open/close "" for a bare list a, b; "{" "}" for a set
#   ("union", parts)


class _Parser:
    """Recursive descent; precedence low to high: , = +- */(implicit) unary ^ postfix(! %)."""

    def __init__(self, toks):
        self.toks, self.i, self.depth = toks, 0, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def accept(self, kind, text):
        if self.peek() == (kind, text):
            self.i += 1
            return True
        return False

    def expect(self, kind, text):
        if not self.accept(kind, text):
            raise _Reject(f"expected {text!r}")

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject("nested too deeply")

    def parse(self):
        parts = [self.bare()]
        while self.accept("op", "cup"):
            parts.append(self.bare())
        if self.peek()[0] != "end":
            raise _Reject("unexpected trailing input")
        return parts[0] if len(parts) == 1 else ("union", tuple(parts))

    def bare(self):
        items = [self.relation()]
        while self.accept("op", ","):
            items.append(self.relation())
        if len(items) > MAX_ITEMS:
            raise _Reject("too many items")
        return items[0] if len(items) == 1 else ("seq", "", "", tuple(items))

    def relation(self):
        left = self.expr()
        if self.accept("op", "="):
            return ("eq", left, self.expr())
        return left

    def expr(self):
        node = self.term()
        while self.peek()[0] == "op" and self.peek()[1] in ("+", "-", "pm"):
            op = self.toks[self.i][1]
            self.i += 1
            node = (op, node, self.term())
        return node

    def starts_operand(self):
        kind, text = self.peek()
        return kind in ("num", "name", "const", "func", "frac") or (kind, text) in (
            ("op", "("), ("op", "{"))

    def term(self):
        node = self.unary()
        while True:
            kind, text = self.peek()
            if kind == "op" and text in ("*", "/"):
                self.i += 1
                node = (text, node, self.unary())
            elif self.starts_operand():  # implicit multiplication: 2x, 2(x+1), (x-1)(x+1)
                if kind == "num" and self.toks[self.i - 1][0] == "num":
                    raise _Reject("two numbers side by side")
                rhs = self.power()
                node = _mixed_number(node, rhs) if kind == "frac" else ("*", node, rhs)
            else:
                return node

    def unary(self):
        self.enter()
        if self.accept("op", "-"):
            node = ("neg", self.unary())
        elif self.accept("op", "+"):
            node = self.unary()
        else:
            node = self.power()
        self.depth -= 1
        return node

    def power(self):
        base = self.postfix()
        if self.accept("op", "^"):
            return ("^", base, self.unary())  # right associative: 2^3^2 = 2^9
        return base

    def postfix(self):
        node = self.primary()
        while True:
            if self.accept("op", "!"):
                node = ("!", node)
            elif self.accept("op", "%"):
                node = ("%", node)
            else:
                return node

    def primary(self):
        self.enter()
        kind, text = self.peek()
        self.i += 1
        if kind == "num":
            node = ("num", _number(text))
        elif kind == "name":
            if self.accept("op", "_"):
                node = ("sym", f"{text}_{self.subscript()}")
            elif text in ("e", "i"):  # Euler's number and the imaginary unit
                node = ("const", "E" if text == "e" else "I")
            else:
                node = ("sym", text)
        elif kind == "const":
            node = ("const", text)
        elif kind == "empty":
            node = ("seq", "{", "}", ())
        elif kind == "frac":
            node = ("/", self.arg(), self.arg())
        elif kind == "func":
            node = self.function(text)
        elif (kind, text) in (("op", "("), ("op", "[")):
            node = self.bracket(text)
        elif (kind, text) == ("op", "{"):
            items = self.items_until("}")
            node = items[0] if len(items) == 1 else ("seq", "{", "}", tuple(items))
        elif (kind, text) == ("op", "\\{"):
            node = ("seq", "{", "}", tuple(self.items_until("\\}", allow_empty=True)))
        else:
            raise _Reject(f"unexpected {text or kind!r}")
        self.depth -= 1
        return node

    def items_until(self, close, allow_empty=False):
        if allow_empty and self.accept("op", close):
            return []
        items = [self.relation()]
        while self.accept("op", ","):
            items.append(self.relation())
        self.expect("op", close)
        if len(items) > MAX_ITEMS:
            raise _Reject("too many items")
        return items

    def bracket(self, opening):
        items = [self.relation()]
        while self.accept("op", ","):
            items.append(self.relation())
        kind, close = self.peek()
        if kind != "op" or close not in (")", "]"):
            raise _Reject("unclosed bracket")
        self.i += 1
        if len(items) == 1:
            if (opening, close) in (("(", ")"), ("[", "]")):
                return items[0]
            raise _Reject("half-open bracket around one value")
        if len(items) > MAX_ITEMS:
            raise _Reject("too many items")
        return ("seq", opening, close, tuple(items))

    def subscript(self):
        kind, text = self.peek()
        if kind in ("num", "name"):
            self.i += 1
            return text
        self.expect("op", "{")
        parts = []
        while self.peek()[0] in ("num", "name"):
            parts.append(self.toks[self.i][1])
            self.i += 1
        self.expect("op", "}")
        if not parts:
            raise _Reject("empty subscript")
        return "".join(parts)

    def arg(self):
        """A LaTeX argument: {group}, or one character (\\frac12 is 1/2)."""
        kind, text = self.peek()
        if (kind, text) == ("op", "{"):
            self.i += 1
            node = self.expr()
            self.expect("op", "}")
            return node
        if kind == "num" and len(text) > 1 and text[1].isdigit():
            self.toks[self.i] = ("num", text[1:])
            return ("num", Fraction(int(text[0])))
        if kind in ("num", "name", "const"):
            return self.primary()
        raise _Reject("missing argument")

    def function(self, name):
        if name == "sqrt" and self.accept("op", "["):
            index = self.expr()
            self.expect("op", "]")
            return ("root", index, self.fn_arg())
        if name == "log" and self.accept("op", "_"):
            base = self.arg()
            return ("logb", base, self.fn_arg())
        power = self.arg() if self.accept("op", "^") else None  # \sin^2 x
        node = ("func", name, self.fn_arg())
        return node if power is None else ("^", node, power)

    def fn_arg(self):
        if self.accept("op", "("):
            node = self.expr()
            self.expect("op", ")")
            return node
        if self.peek() == ("op", "{"):
            return self.arg()
        return self.power()  # \sin x, \ln 2, \sqrt2


def _mixed_number(whole, fraction):
    """2\\frac{1}{2} is 5/2, as in school answers; 2\\frac{x}{3} stays a product."""
    sign, w = (-1, whole[1]) if whole[0] == "neg" else (1, whole)
    f = fraction
    if (w[0] == "num" and w[1].denominator == 1 and f[0] == "/" and f[1][0] == "num"
            and f[2][0] == "num" and 0 < f[1][1] < f[2][1]):
        return ("num", sign * (w[1] + f[1][1] / f[2][1]))
    return ("*", whole, fraction)


@lru_cache(maxsize=65536)
def _parse_answer(text: str):
    """Normalised text -> AST, or None when it is not an answer we can read."""
    try:
        return _Parser(_tokenize(text)).parse()
    except (_Reject, ValueError, ZeroDivisionError, RecursionError, OverflowError):
        return None


def _children(node):
    tag = node[0]
    if tag in ("num", "sym", "const"):
        return ()
    if tag == "func":
        return (node[2],)
    if tag == "seq":
        return node[3]
    if tag == "union":
        return node[1]
    return node[1:]


def _walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(_children(n))


def _symbols(node) -> frozenset:
    return frozenset(n[1] for n in _walk(node) if n[0] == "sym")


def _is_rational_function(node) -> bool:
    """Built from numbers and symbols by + - * / and symbol-free powers and factorials."""
    for n in _walk(node):
        tag = n[0]
        if tag in ("const", "func", "root", "logb"):
            return False
        if tag in ("!", "^") and _symbols(n[-1] if tag == "^" else n[1]):
            return False
    return True


# Exact evaluation (Fraction), bounded ---------------------------------------------------------


def _sized(q: Fraction) -> Fraction:
    if q.numerator.bit_length() > MAX_BITS or q.denominator.bit_length() > MAX_BITS:
        raise _Reject("number too large")
    return q


def _exact_pow(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise _NotRational
    k = exponent.numerator
    if abs(k) > MAX_EXPONENT:
        raise _Reject("exponent too large")
    if base == 0 and k < 0:
        raise ZeroDivisionError
    if max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(k) > MAX_BITS:
        raise _Reject("power too large")
    return base**k


def _exact(node, env) -> Fraction:
    tag = node[0]
    if tag == "num":
        return node[1]
    if tag == "sym":
        return env[node[1]]
    if tag in ("+", "-", "*", "/"):
        a, b = _exact(node[1], env), _exact(node[2], env)
        return _sized(a + b if tag == "+" else a - b if tag == "-" else a * b if tag == "*" else a / b)
    if tag == "neg":
        return -_exact(node[1], env)
    if tag == "^":
        return _exact_pow(_exact(node[1], env), _exact(node[2], env))
    if tag == "%":
        return _exact(node[1], env) / 100
    if tag == "!":
        v = _exact(node[1], env)
        if v.denominator != 1:
            raise _NotRational  # (1/2)! is a gamma value
        if v < 0 or v > MAX_FACTORIAL:
            raise _Reject("factorial out of range")
        return Fraction(math.factorial(int(v)))
    if tag in ("const", "func", "root", "logb"):
        raise _NotRational
    raise _Reject(f"{tag} is not a number")


_PROBE_SEED = secrets.randbits(64)  # per process, so no answer can be tuned to the points


def _probe_values(names, k):
    rng = random.Random(_PROBE_SEED + k)
    return {name: Fraction(rng.choice((-1, 1)) * rng.randint(2, 9999)) for name in names}


def _equal_rational_functions(a, b, names, deadline) -> bool:
    """Polynomial identity testing, exactly: two different rational functions of low degree
    agree at a handful of random integer points with negligible probability."""
    agreed = 0
    for k in range(8):
        if time.monotonic() > deadline:
            raise _Timeout
        env = _probe_values(names, k)
        try:
            va, vb = _exact(a, env), _exact(b, env)
        except ZeroDivisionError:  # a pole at this point; try another
            continue
        if va != vb:
            return False
        agreed += 1
        if agreed == 4:
            return True
    return agreed >= 2


def _check_bounds(node) -> None:
    """Before anything symbolic: numeric exponents and factorial arguments must be small."""
    for n in _walk(node):
        try:
            _check_node_bounds(n)
        except _NotRational:  # 2^(4^(1/2)): left to sympy, under the time limit
            pass


def _check_node_bounds(n) -> None:
    if n[0] == "^" and not _symbols(n[2]) and _is_rational_function(n[2]):
        e = _exact(n[2], {})
        if abs(e.numerator) > MAX_EXPONENT or e.denominator > 1000:
            raise _Reject("exponent too large")
        if not _symbols(n[1]) and _is_rational_function(n[1]):
            base = _exact(n[1], {})
            bits = max(base.numerator.bit_length(), base.denominator.bit_length())
            if bits * abs(e.numerator) / e.denominator > MAX_BITS:
                raise _Reject("power too large")
    if n[0] == "!" and not _symbols(n[1]) and _is_rational_function(n[1]):
        if abs(_exact(n[1], {})) > MAX_FACTORIAL:
            raise _Reject("factorial too large")


# Floating-point probe: a quick "different" for symbolic answers, never a "same" -----------------

_CFUNCS = {"sqrt": cmath.sqrt, "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan,
           "cot": lambda z: 1 / cmath.tan(z), "sec": lambda z: 1 / cmath.cos(z),
           "csc": lambda z: 1 / cmath.sin(z), "arcsin": cmath.asin, "arccos": cmath.acos,
           "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh,
           "ln": cmath.log, "log": cmath.log, "exp": cmath.exp, "abs": abs}
_CONSTS = {"pi": cmath.pi, "E": cmath.e, "I": 1j}
_PROBE_POINTS = (0.73 + 0.41j, -1.19 + 0.67j, 1.57 - 0.88j)


def _approx(node, env):
    """(value, magnitude): magnitude bounds the size of the terms summed, so that rounding error
    is about 1e-16 of it and cancellation cannot fake a difference."""
    tag = node[0]
    if tag == "num":
        v = complex(float(node[1]))
        return v, abs(v)
    if tag == "sym":
        v = env[node[1]]
        return v, abs(v)
    if tag == "const":
        if node[1] not in _CONSTS:
            raise ArithmeticError("infinity")
        v = _CONSTS[node[1]]
        return v, abs(v)
    if tag in ("neg", "%", "!", "func"):
        a, ma = _approx(node[-1], env)
        if tag == "neg":
            return -a, ma
        if tag == "%":
            return a / 100, ma / 100
        if tag == "!":
            if a.imag or a.real != int(a.real) or not 0 <= a.real <= 170:
                raise ArithmeticError("factorial")
            v = complex(math.factorial(int(a.real)))
            return v, abs(v)
        v = complex(_CFUNCS[node[1]](a))
        return v, (abs(v) + 1) * (1 + ma)  # generous: the error of a is scaled by f'(a)
    (a, ma), (b, mb) = _approx(node[1], env), _approx(node[2], env)
    if tag in ("+", "-"):
        return (a + b if tag == "+" else a - b), ma + mb
    if tag == "*":
        return a * b, ma * mb
    if tag == "/":
        v = a / b
        return v, (ma + abs(v) * mb) / abs(b)
    if tag == "^":
        v = a**b
        integral = not b.imag and b.real == int(b.real)
        return v, (ma ** abs(b.real) if integral and ma else abs(v))
    if tag == "root":  # node = ("root", n, x)
        v = b ** (1 / a)
        return v, abs(v)
    if tag == "logb":  # node = ("logb", base, x)
        v = cmath.log(b) / cmath.log(a)
        return v, abs(v) + 1
    raise ArithmeticError(tag)


def _approx_differs(a, b, names) -> bool:
    for base in _PROBE_POINTS:
        env = {name: base * (1 + 0.31 * i) + 0.17j * i for i, name in enumerate(names)}
        try:
            va, ma = _approx(a, env)
            vb, mb = _approx(b, env)
        except (ArithmeticError, ValueError, TypeError, KeyError):
            continue
        if not (cmath.isfinite(va) and cmath.isfinite(vb) and math.isfinite(ma + mb)):
            continue
        if abs(va - vb) > 1e-8 * (1.0 + ma + mb):
            return True
    return False


# Sympy in a worker process, killed when the time limit passes -----------------------------------

_SYMPY_NAMES = {"arcsin": "asin", "arccos": "acos", "arctan": "atan", "ln": "log", "abs": "Abs"}


def _to_sympy(node, sp):
    """AST -> sympy, with explicit constructors: no string ever reaches sympify."""
    tag = node[0]
    if tag == "num":
        return sp.Rational(node[1].numerator, node[1].denominator)
    if tag == "sym":
        return sp.Symbol(node[1])
    if tag == "const":
        return {"pi": sp.pi, "E": sp.E, "I": sp.I, "oo": sp.oo}[node[1]]
    if tag == "func":
        name = node[1]
        return getattr(sp, _SYMPY_NAMES.get(name, name))(_to_sympy(node[2], sp))
    args = [_to_sympy(n, sp) for n in node[1:]]
    if tag == "+":
        return sp.Add(args[0], args[1])
    if tag == "-":
        return sp.Add(args[0], -args[1])
    if tag == "*":
        return sp.Mul(args[0], args[1])
    if tag == "/":
        return sp.Mul(args[0], sp.Pow(args[1], -1))
    if tag == "^":
        return sp.Pow(args[0], args[1])
    if tag == "neg":
        return -args[0]
    if tag == "%":
        return args[0] / 100
    if tag == "!":
        return sp.factorial(args[0])
    if tag == "root":
        return sp.root(args[1], args[0])
    if tag == "logb":
        return sp.log(args[1], args[0])
    raise ValueError(tag)


def _sympy_equal(a, b) -> bool:
    import sympy as sp

    x, y = _to_sympy(a, sp), _to_sympy(b, sp)
    if x == y:
        return True
    if any(e.has(sp.oo, -sp.oo, sp.zoo, sp.nan) for e in (x, y)):
        return False
    diff = x - y
    return diff == 0 or sp.simplify(diff) == 0


def _sympy_worker_main() -> None:
    """Loop of the worker process: read pickled AST pairs from our parent, answer one byte."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    import sympy  # noqa: F401  (imported before announcing readiness)

    rd, wr = sys.stdin.buffer, sys.stdout.buffer
    wr.write(b"R")
    wr.flush()
    while True:
        head = rd.read(4)
        if len(head) < 4:
            return
        a, b = pickle.loads(rd.read(struct.unpack("<I", head)[0]))
        try:
            ok = _sympy_equal(a, b)
        except Exception:
            ok = False
        wr.write(b"1" if ok else b"0")
        wr.flush()


_WORKER_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import rewards; rewards._sympy_worker_main()"


def _read_byte(fd: int, deadline: float) -> bytes | None:
    """One byte from fd, or None at EOF or once the deadline passes (a deadline in the past
    still polls once)."""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if sel.select(max(left, 0.0)):
                return os.read(fd, 1) or None
            if left <= 0:
                return None


class _SympyWorker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _WORKER_BOOT, os.path.dirname(os.path.abspath(__file__))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.ready = False

    def wait_ready(self, deadline: float) -> bool:
        if not self.ready:
            self.ready = _read_byte(self.proc.stdout.fileno(), deadline) == b"R"
        return self.ready

    def compare(self, a, b, deadline: float) -> bool:
        if not self.wait_ready(time.monotonic() + SYMPY_STARTUP_TIMEOUT):
            raise _Timeout
        data = pickle.dumps((a, b))
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        answer = _read_byte(self.proc.stdout.fileno(), deadline)
        if answer is None:
            raise _Timeout
        return answer == b"1"

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()


_pool_lock = threading.Lock()
_pool_slots = threading.BoundedSemaphore(SYMPY_WORKERS)
_idle_workers: list[_SympyWorker] = []
_pool_pid = os.getpid()


def _take_worker() -> _SympyWorker:
    global _pool_pid
    with _pool_lock:
        if _pool_pid != os.getpid():  # forked: the workers belong to the parent
            _idle_workers.clear()
            _pool_pid = os.getpid()
        for i, worker in enumerate(_idle_workers):  # one that has imported sympy, if any
            if worker.wait_ready(0.0):
                return _idle_workers.pop(i)
        if _idle_workers:
            return _idle_workers.pop()
    return _SympyWorker()


def _sympy_compare(a, b, deadline: float) -> bool:
    if not _pool_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise _Timeout
    try:
        worker = _take_worker()
        try:
            ok = worker.compare(a, b, deadline)
        except BaseException:
            worker.kill()
            with _pool_lock:  # start a replacement now, so its sympy import overlaps other work
                _idle_workers.append(_SympyWorker())
            raise
        with _pool_lock:
            _idle_workers.append(worker)
        return ok
    finally:
        _pool_slots.release()


def warmup() -> None:
    """Start the sympy workers now (each imports sympy, about a second) rather than on the first
    symbolic answers; with a warm spare, a worker killed at a time limit is replaced at once."""
    with _pool_lock:
        new = [_SympyWorker() for _ in range(SYMPY_WORKERS - len(_idle_workers))]
    deadline = time.monotonic() + SYMPY_STARTUP_TIMEOUT
    for worker in new:
        worker.wait_ready(deadline)
    with _pool_lock:
        _idle_workers.extend(new)


@atexit.register
def _stop_workers():
    with _pool_lock:
        for worker in _idle_workers:
            worker.kill()
        _idle_workers.clear()


# Equivalence ------------------------------------------------------------------------------------

_result_cache: dict = {}  # (ast, ast) -> bool; timeouts are never cached


def _scalar(a, b, deadline) -> bool:
    if a == b:
        return True
    key = (a, b)
    hit = _result_cache.get(key)
    if hit is not None:
        return hit
    try:
        result = _scalar_uncached(a, b, deadline)
    except (_Reject, ArithmeticError, ValueError, TypeError, KeyError, RecursionError):
        result = False
    if len(_result_cache) > 100_000:
        _result_cache.clear()
    _result_cache[key] = result
    return result


def _scalar_uncached(a, b, deadline) -> bool:
    if time.monotonic() > deadline:
        raise _Timeout
    names = sorted(_symbols(a) | _symbols(b))
    if _is_rational_function(a) and _is_rational_function(b):
        try:
            if not names:
                return _exact(a, {}) == _exact(b, {})
            return _equal_rational_functions(a, b, names, deadline)
        except _NotRational:  # 4^(1/2): an exponent that is not an integer
            pass
    _check_bounds(a)
    _check_bounds(b)
    if _approx_differs(a, b, names):
        return False
    return _sympy_compare(a, b, deadline)


def _scalar_or_percent(a, b, deadline) -> bool:
    """50% equals 0.5, and also 50 (the number before the sign), when only one side has %."""
    pa, pb = a[0] == "%", b[0] == "%"
    if pa and pb:
        return _scalar(a[1], b[1], deadline)
    if pa:
        return _scalar(a, b, deadline) or _scalar(a[1], b, deadline)
    if pb:
        return _scalar(a, b, deadline) or _scalar(a, b[1], deadline)
    return _scalar(a, b, deadline)


def _expand_pm(node):
    """1 \\pm \\sqrt2 at the top of an answer is the set {1 + sqrt2, 1 - sqrt2}."""
    if node[0] in ("seq", "union", "eq") or not any(n[0] == "pm" for n in _walk(node)):
        return node
    variants = [node]
    while any(n[0] == "pm" for n in _walk(variants[0])):
        if len(variants) > 4:
            raise _Reject("too many \\pm")
        variants = [v for var in variants for v in (_replace_pm(var, "+"), _replace_pm(var, "-"))]
    return ("seq", "", "", tuple(variants))


def _replace_pm(node, op):
    """Replace the first pm (in walk order) with op."""
    if node[0] == "pm":
        return (op, node[1], node[2])
    if node[0] in ("num", "sym", "const"):
        return node
    if node[0] == "func":
        return ("func", node[1], _replace_pm(node[2], op))
    for i in range(1, len(node)):
        if any(n[0] == "pm" for n in _walk(node[i])):
            return node[:i] + (_replace_pm(node[i], op),) + node[i + 1:]
    return node


def _unordered(node) -> bool:
    return node[0] == "seq" and node[1] in ("", "{")


def _same_set(xs, ys, deadline) -> bool:
    return (all(any(_equal(x, y, deadline) for y in ys) for x in xs)
            and all(any(_equal(x, y, deadline) for x in xs) for y in ys))


def _equal(a, b, deadline) -> bool:
    a, b = _expand_pm(a), _expand_pm(b)
    if a == b:
        return True
    ka, kb = a[0], b[0]
    if ka == "eq" and kb != "eq" and a[1][0] == "sym":  # "x = 5" answers "5"
        return _equal(a[2], b, deadline)
    if kb == "eq" and ka != "eq" and b[1][0] == "sym":
        return _equal(a, b[2], deadline)
    if ka == "eq" or kb == "eq":
        if ka != kb:
            return False
        if _equal(a[1], b[1], deadline) and _equal(a[2], b[2], deadline):
            return True
        da, db = ("-", a[1], a[2]), ("-", b[1], b[2])
        return _scalar(da, db, deadline) or _scalar(da, ("neg", db), deadline)
    if _unordered(a) or _unordered(b):  # sets and bare lists; a lone value is a singleton
        xs = a[3] if _unordered(a) else (a,)
        ys = b[3] if _unordered(b) else (b,)
        return _same_set(xs, ys, deadline)
    if ka == "seq" or kb == "seq":  # tuples and intervals: brackets and order matter
        return (ka == kb and a[1:3] == b[1:3] and len(a[3]) == len(b[3])
                and all(_equal(x, y, deadline) for x, y in zip(a[3], b[3])))
    if ka == "union" or kb == "union":
        return ka == kb and _same_set(a[1], b[1], deadline)
    return _scalar_or_percent(a, b, deadline)


_TEXT_ANSWER_RE = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")


def _is_text_answer(s: str) -> bool:
    """Yes, Monday, even: words, not a product of single-letter symbols."""
    return bool(_TEXT_ANSWER_RE.fullmatch(s)) and any(
        len(w) >= 3 and w.lower() not in _WORDS for w in s.split())


def math_equal(pred, gold, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether two final answers are mathematically the same. Rules: numbers compare exactly
    (0.5 = 1/2 = 50%, 1e3 = 1,000 = 1000, 0.333 != 1/3); a % on one side only may be read either
    way; tuples and intervals are ordered and keep their brackets; sets and bare lists (1, 2) are
    unordered; "x = 5" matches "5"; expressions are equal when their difference is identically
    zero. Anything unreadable, too big, or not settled within `timeout` seconds is False.
    The limit holds on any thread; the one wait it does not cover is a sympy worker's cold start
    (about a second, once per worker; warmup() does it ahead of time)."""
    try:
        return _math_equal(pred, gold, time.monotonic() + timeout)
    except Exception:  # includes _Timeout, MemoryError, RecursionError
        return False


def _math_equal(pred, gold, deadline) -> bool:
    if not (isinstance(pred, str) and isinstance(gold, str)):
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    if _PLAIN_NUMBER_RE.fullmatch(pred) and _PLAIN_NUMBER_RE.fullmatch(gold):
        return Fraction(pred) == Fraction(gold)  # the common case, in microseconds
    p, g = _normalize(pred), _normalize(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    if _is_text_answer(g) or _is_text_answer(p):
        return p.casefold() == g.casefold()
    a, b = _parse_answer(p), _parse_answer(g)
    if a is None or b is None:
        return False
    return _equal(a, b, deadline)


# Countdown ---------------------------------------------------------------------------------------

_COUNTDOWN_RE = re.compile(r"[\d\s+\-*/()]+")


def countdown_check(expr, numbers, target) -> bool:
    """expr uses + - * / and parentheses on each of `numbers` exactly once and equals target."""
    if not isinstance(expr, str) or len(expr) > 200:
        return False
    s = (expr.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
         .replace("×", "*").replace("÷", "/").replace("−", "-"))
    if "=" in s:  # "expr = target" is fine when the right side is the target
        s, rhs = s.rsplit("=", 1)
        if not re.fullmatch(r"\s*\d+\s*", rhs) or int(rhs) != target:
            return False
    if not _COUNTDOWN_RE.fullmatch(s):
        return False
    tree = _parse_answer(" ".join(s.split()))
    if tree is None:
        return False
    leaves = []
    for n in _walk(tree):
        if n[0] == "num":
            leaves.append(n[1])
        elif n[0] not in ("+", "-", "*", "/"):
            return False
    try:
        return sorted(leaves) == sorted(Fraction(v) for v in numbers) and _exact(tree, {}) == target
    except (ZeroDivisionError, _Reject, _NotRational):
        return False


def countdown_reward(completion: str, problem: Problem) -> float:
    try:
        ok = countdown_check(extract_answer(completion), problem.meta["numbers"], problem.meta["target"])
    except Exception:
        return 0.0
    return 1.0 if ok else 0.0


# Format -----------------------------------------------------------------------------------------

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def format_reward(completion: str, problem: Problem | None = None, partial: bool = False) -> float:
    """1.0 for exactly `<think> ... </think> <answer> ... </answer>` (whitespace aside, both parts
    non-empty) and nothing else; the whole string must match, so no text may trail (no MULTILINE
    loophole). The caller strips special tokens such as end-of-text first. With partial=True a
    malformed completion earns 0.2 per tag that occurs exactly once (at most 0.8)."""
    if not isinstance(completion, str):
        return 0.0
    counts = [completion.count(tag) for tag in _TAGS]
    if counts == [1, 1, 1, 1]:
        m = _FORMAT_RE.fullmatch(completion)
        if m and m.group(1).strip() and m.group(2).strip():
            return 1.0
    return 0.2 * sum(c == 1 for c in counts) if partial else 0.0


# Language consistency ----------------------------------------------------------------------------

_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_WORD_RE = re.compile(f"[{_LATIN}]+|[{_HAN}]|(?:(?![{_LATIN}{_HAN}])[^\\W\\d_])+")
_LANG_SCRIPT = {"en": re.compile(f"[{_LATIN}]"), "zh": re.compile(f"[{_HAN}]")}


def _chain_of_thought(text: str) -> str:
    start = text.find("<think>")
    if start < 0:
        return text
    end = text.find("</think>", start)
    return text[start + len("<think>"):end if end >= 0 else len(text)]


def language_consistency_reward(completion: str, problem: Problem | None = None,
                                lang: str | None = None) -> float:
    """R1 stage 2: the share of words of the chain of thought (inside <think>, or the whole text
    when there is none) written in the target language's script. A word is a maximal run of
    letters of one script (Latin, or another alphabet), except that each Han character counts as
    a word: Chinese has no spaces, so a run is a whole clause. Digits and symbols are not words.
    No words at all scores 0.0, so an empty chain of thought earns nothing. lang defaults to
    problem.meta["lang"], else "en"; "en" and "zh" are known (others raise ValueError)."""
    if lang is None:
        meta = getattr(problem, "meta", None)
        lang = meta.get("lang", "en") if isinstance(meta, dict) else "en"
    if lang not in _LANG_SCRIPT:
        raise ValueError(f"unknown language {lang!r}; known: {sorted(_LANG_SCRIPT)}")
    if not isinstance(completion, str):
        return 0.0
    words = _WORD_RE.findall(_chain_of_thought(completion))
    if not words:
        return 0.0
    is_target = _LANG_SCRIPT[lang].match
    return sum(1 for w in words if is_target(w)) / len(words)


# Overlong shaping (DAPO eq. 13) ------------------------------------------------------------------


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """0 up to max_len - cache_len tokens, then a linear ramp to -1 at max_len, -1 beyond."""
    expected = max_len - cache_len
    if length <= expected:
        return 0.0
    if length <= max_len:
        return (expected - length) / cache_len
    return -1.0


# Code: a sandbox in a child process -------------------------------------------------------------


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 5.0  # for the solution and all its tests together
    cpu_s: int = 5
    memory_mb: int = 512  # address space
    nproc: int = 32  # processes and threads of the sandbox uid
    fsize_mb: int = 16  # any file written, and the size of the tmpfs
    nofile: int = 64
    output_bytes: int = 1 << 20  # results read back; more is dropped
    python_guards: bool = True  # also refuse sockets, subprocesses, ctypes, writes outside cwd


@dataclass
class SandboxResult:
    passed: int
    total: int
    timed_out: bool
    layers: tuple[str, ...]  # isolation layers that were in force
    uid: int | None  # the sandbox's own uid, when we run as root
    error: str = ""  # why the solution did not even load, if it did not
    stderr: str = ""  # what the solution printed, capped
    details: list = field(default_factory=list)  # per test: (status, payload)


# What each layer guarantees (sandbox_layers() lists those in force; as root on Linux, all):
#   netns          a new network namespace whose only interface, loopback, is down: no socket
#                  reaches the host's loopback or any other address
#   mountns        mounts made for the sandbox are private to it and vanish with it
#   stdlib         the interpreter stays readable when it lives under /root (pyenv)
#   readonly_fs    every mount read-only and nosuid (mount_setattr, Linux >= 5.12)
#   tmpfs_workdir  the work directory is a fresh, size-capped tmpfs: the one writable place
#   pidns, proc    the solution is init of its own pid namespace and /proc shows nothing else:
#                  killing it kills every descendant, even one that called setsid, and no other
#                  process (nor its environ or cmdline) is visible
#   uid            a uid of its own, not root and unique per sandbox: root's files are closed to
#                  it, it can signal no one else, and RLIMIT_NPROC caps its processes (fork bombs)
#   no_new_privs   setuid binaries grant nothing
#   rlimits        CPU seconds, address space, file size, open files, no core dumps
#   python_guards  an audit hook refuses sockets, subprocesses, ctypes and writes outside the work
#                  directory; defence in depth only, as Python code can get around it
# Always: empty environment, stdin from /dev/null, results on a pipe read with a cap, a wall
# clock, and the process group killed at the end. Not root: no kernel layer (and no NPROC limit).
#
# The child runs this with `python -I -S -B`. As root it unshares the namespaces, sets up the
# mounts and forks the namespace's init, which sets rlimits, drops to the sandbox uid and runs the
# solution and the tests. The first process stays as supervisor and kills the init at the
# wall-clock limit. Each result line starts with a random nonce the solution is not given (it
# could find it by introspection, which only matters for plain-assert tests; see _split_test).
_HARNESS = r'''
import ctypes, json, os, resource, select, sys, time

cfg = json.loads(sys.stdin.buffer.read())
nonce, work, uid = cfg["nonce"], cfg["workdir"], cfg["uid"]
out = os.dup(1)
layers = []


def emit(line):
    os.write(out, ("%s %s\n" % (nonce, line)).encode("ascii", "backslashreplace"))


libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x1000, 0x2000, 0x4000, 0x40000


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    return libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0


def expose_stdlib():
    # The interpreter may sit under a directory the sandbox uid cannot enter (pyenv in /root):
    # cover the top such directory with an empty tmpfs and move the Python prefix back into it.
    prefix, top, d = sys.base_prefix, None, sys.base_prefix
    while d not in ("/", ""):
        if not os.stat(d).st_mode & 0o001:
            top = d
        d = os.path.dirname(d)
    if top is None:
        return True
    if not mount(prefix, work, None, MS_BIND | MS_REC):
        return False
    if mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k"):
        os.makedirs(prefix, exist_ok=True)
        return mount(work, prefix, None, MS_MOVE)
    return False


def isolate():
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET: only a loopback, and it is down
        layers.append("netns")
    if libc.unshare(0x00020000 | 0x08000000 | 0x04000000) != 0:  # NEWNS | NEWIPC | NEWUTS
        return
    if not mount(None, "/", None, MS_REC | MS_PRIVATE):  # so no mount reaches the host
        return
    layers.append("mountns")
    if expose_stdlib():
        layers.append("stdlib")

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    attr = MountAttr(0x1 | 0x2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | NOSUID (not NODEV: /dev/null)
    L = ctypes.c_long
    if libc.syscall(L(442), L(-100), ctypes.c_char_p(b"/"), L(0x8000), ctypes.byref(attr),
                    L(ctypes.sizeof(attr))) == 0:  # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE)
        layers.append("readonly_fs")
    opts = "size=%dk,mode=0700,uid=%d,gid=%d" % (cfg["fsize_kb"], uid, uid)
    if mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, opts):
        layers.append("tmpfs_workdir")
    if libc.unshare(0x20000000) == 0:  # CLONE_NEWPID: our next child is the namespace's init
        layers.append("pidns")


def guard():
    blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "os.fork", "os.forkpty", "ctypes.", "os.kill", "os.killpg", "pty.", "signal.pthread_kill")
    mutating = ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.symlink", "os.link",
                "os.chmod", "os.chown", "os.truncate", "os.utime")
    here = os.path.realpath(work)
    realpath, fsdecode = os.path.realpath, os.fsdecode
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path):
        if not isinstance(path, (str, bytes)):
            return True
        p = realpath(fsdecode(path))
        return p == here or p.startswith(here + "/")

    def hook(event, args):
        if event.startswith(blocked):
            raise PermissionError("sandbox: " + event)
        if event == "open" and len(args) >= 3:
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & writes)
            if writing and not inside(args[0]):
                raise PermissionError("sandbox: write outside the work directory")
        elif event in mutating and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
            raise PermissionError("sandbox: " + event + " outside the work directory")

    sys.addaudithook(hook)


def run_solution():
    if "pidns" in layers and "mountns" in layers and mount(
            "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC):
        layers.append("proc")  # this namespace's processes only
    lim = cfg["limits"]
    setl = resource.setrlimit
    setl(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    setl(resource.RLIMIT_AS, (lim["memory_mb"] << 20,) * 2)
    setl(resource.RLIMIT_FSIZE, (lim["fsize_mb"] << 20,) * 2)
    setl(resource.RLIMIT_NOFILE, (lim["nofile"],) * 2)
    setl(resource.RLIMIT_CORE, (0, 0))
    if uid is not None:  # counted per uid, so only meaningful with a uid of our own
        setl(resource.RLIMIT_NPROC, (lim["nproc"],) * 2)
    layers.append("rlimits")
    if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS: setuid binaries give nothing
        layers.append("no_new_privs")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        layers.append("uid")
    os.chdir(work)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)  # the solution's prints go to stderr; results use `out`
    if cfg["python_guards"]:
        guard()
        layers.append("python_guards")
    emit("layers " + ",".join(layers))
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(cfg["code"], "<solution>", "exec"), ns)
    except BaseException as e:
        emit("error " + type(e).__name__)
        return
    for i, (mode, src) in enumerate(cfg["tests"]):
        try:
            if mode == "value":
                emit("%d v %s" % (i, json.dumps(repr(eval(compile(src, "<test>", "eval"), ns))[:100000])))
            else:
                exec(compile(src, "<test>", "exec"), ns)
                emit("%d ok" % i)
        except BaseException as e:
            emit("%d err %s" % (i, type(e).__name__))


if os.geteuid() == 0 and uid is not None:
    isolate()
pid = os.fork()
if pid == 0:
    try:
        if "pidns" not in layers:
            os.setpgid(0, 0)  # a group of its own for the supervisor to kill
        run_solution()
    finally:
        os._exit(0)
try:
    timed_out = not select.select([os.pidfd_open(pid)], [], [], cfg["wall_s"])[0]
except (AttributeError, OSError):
    end = time.monotonic() + cfg["wall_s"]
    while os.waitpid(pid, os.WNOHANG)[0] == 0 and time.monotonic() < end:
        time.sleep(0.005)
    timed_out = time.monotonic() >= end
if timed_out:
    emit("timeout")
    try:
        os.kill(pid, 9) if "pidns" in layers else os.killpg(pid, 9)
    except OSError:
        pass
try:
    os.waitpid(pid, 0)
except ChildProcessError:
    pass
if "pidns" not in layers:  # without a namespace to die with it, kill what the solution left
    try:
        os.killpg(pid, 9)
    except OSError:
        pass
os._exit(0)
'''

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _acquire_uid() -> int | None:
    """A uid no other sandbox uses: NPROC then counts this sandbox alone, and its processes cannot
    signal anyone else's. 2^30 + pid * 256 + slot, unique per process and concurrent call."""
    if os.geteuid() != 0:
        return None
    base = (1 << 30) + ((os.getpid() % (1 << 22)) << 8)
    with _uid_lock:
        for slot in range(256):
            if base + slot not in _uids_in_use:
                _uids_in_use.add(base + slot)
                return base + slot
    raise RuntimeError("more than 256 concurrent sandboxes in one process")


def _uid_processes(uid: int) -> list[int]:
    """Pids whose real uid is `uid` (read from /proc/<pid>/status)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(name))
                        break
        except (OSError, ValueError):
            continue
    return pids


def _kill_uid(uid: int) -> None:
    for _ in range(100):
        pids = _uid_processes(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _split_test(test: str):
    """`assert call == literal` runs as ("value", call): the child reports repr(call) and the
    parent compares, so a solution that rigs __eq__ or the assert cannot pass it. Anything else
    runs as a plain statement in the child."""
    try:
        tree = ast.parse(test)
        stmt = tree.body[0] if len(tree.body) == 1 else None
        if isinstance(stmt, ast.Assert) and stmt.msg is None and isinstance(stmt.test, ast.Compare):
            cmp = stmt.test
            if len(cmp.ops) == 1 and isinstance(cmp.ops[0], ast.Eq):
                return ("value", ast.unparse(cmp.left), ast.literal_eval(cmp.comparators[0]))
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        pass
    return ("assert", test, None)


def _read_value(text: str):
    if text == "set()":
        return set()
    return ast.literal_eval(text)


def _communicate(proc, payload: bytes, caps: tuple[int, int], deadline: float):
    try:
        proc.stdin.write(payload)
        proc.stdin.close()
    except OSError:
        pass
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    limit = {proc.stdout.fileno(): caps[0], proc.stderr.fileno(): caps[1]}
    expired = False
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                expired = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                if len(buf) < limit[key.fd]:  # beyond the cap we keep draining, but drop
                    buf += chunk[:limit[key.fd] - len(buf)]
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), expired


def run_tests(code: str, tests: list[str], limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` and then each test in a fresh sandboxed interpreter (standard library only)."""
    limits = limits or SandboxLimits()
    parsed = [_split_test(t) for t in tests]
    nonce = secrets.token_hex(16)
    uid = _acquire_uid()
    workdir = tempfile.mkdtemp(prefix="r1-sandbox-")
    cfg = {"nonce": nonce, "workdir": workdir, "uid": uid, "code": code, "wall_s": limits.wall_s,
           "tests": [(mode, src) for mode, src, _ in parsed], "python_guards": limits.python_guards,
           "fsize_kb": limits.fsize_mb << 10,
           "limits": {k: getattr(limits, k) for k in ("cpu_s", "memory_mb", "nproc", "fsize_mb", "nofile")}}
    out = err = b""
    expired = False
    proc = None
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)  # in case the tmpfs layer is missing
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _HARNESS],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={}, cwd=workdir, start_new_session=True, close_fds=True)
        out, err, expired = _communicate(proc, json.dumps(cfg).encode(), (limits.output_bytes, 1 << 16),
                                         time.monotonic() + limits.wall_s + 10.0)
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
    layers: tuple[str, ...] = ()
    results: dict[int, tuple[str, str]] = {}
    timed_out, error = expired, ""
    prefix = nonce.encode() + b" "
    for line in out.split(b"\n"):
        if not line.startswith(prefix):
            continue
        parts = line[len(prefix):].decode("ascii", "replace").split(" ", 2)
        if parts[0] == "layers" and not layers:
            layers = tuple(p for p in parts[1].split(",") if p) if len(parts) > 1 else ()
        elif parts[0] == "timeout":
            timed_out = True
        elif parts[0] == "error":
            error = error or (parts[1] if len(parts) > 1 else "error")
        elif parts[0].isdigit() and int(parts[0]) not in results and len(parts) > 1:
            results[int(parts[0])] = (parts[1], parts[2] if len(parts) > 2 else "")
    if uid is not None:
        if expired or "pidns" not in layers:  # nothing guarantees the processes are gone
            _kill_uid(uid)
        with _uid_lock:
            _uids_in_use.discard(uid)
    shutil.rmtree(workdir, ignore_errors=True)
    passed = 0
    details = []
    for i, (mode, _, expected) in enumerate(parsed):
        status, payload = results.get(i, ("missing", ""))
        ok = False
        if mode == "value" and status == "v":
            try:
                ok = bool(_read_value(json.loads(payload)) == expected)
            except Exception:
                ok = False
        elif mode == "assert":
            ok = status == "ok"
        passed += ok
        details.append((status, payload[:200]))
    return SandboxResult(passed, len(parsed), timed_out, layers, uid, error,
                         err.decode("utf-8", "replace"), details)


@lru_cache(maxsize=1)
def sandbox_layers() -> frozenset:
    """The isolation layers this machine gives a sandbox, measured by running one."""
    return frozenset(run_tests("def f():\n    return 1\n", ["assert f() == 1"]).layers)


_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)
MAX_CODE_CHARS = 100_000


def extract_code(completion) -> str | None:
    """The last fenced block of the answer (or of the whole text), else the answer itself."""
    if not isinstance(completion, str):
        return None
    answer = extract_answer(completion)
    blocks = _FENCE_RE.findall(answer if answer is not None else completion)
    if blocks:
        return blocks[-1]
    return answer or None


def code_reward(completion: str, problem: Problem, limits: SandboxLimits | None = None) -> float:
    """Fraction of problem.tests passed by the solution in the completion, in [0, 1]."""
    try:
        tests = problem.tests
        code = extract_code(completion)
        if not tests or not code or len(code) > MAX_CODE_CHARS:
            return 0.0
        result = run_tests(code, tests, limits)
        return result.passed / result.total
    except Exception as e:
        warnings.warn(f"code_reward: sandbox failed: {e!r}")
        return 0.0


# Accuracy dispatch and the combiner -------------------------------------------------------------


def accuracy_reward(completion: str, problem: Problem) -> float:
    """By problem.kind: "countdown" 1.0 for a valid expression; "code" the fraction of tests
    passed; "math" (and any other kind) 1.0 when the extracted answer equals problem.answer."""
    try:
        kind = getattr(problem, "kind", "math")
        if kind == "code":
            return code_reward(completion, problem)
        if kind == "countdown":
            return countdown_reward(completion, problem)
        answer = extract_answer(completion)
        return 1.0 if answer is not None and math_equal(answer, problem.answer) else 0.0
    except Exception:
        return 0.0


@dataclass
class RewardSpec:
    name: str
    fn: Callable[[str, Problem], float]
    weight: float = 1.0


def r1_zero_specs() -> list[RewardSpec]:
    """R1-Zero's rule reward: accuracy + format, equal weight."""
    return [RewardSpec("accuracy", accuracy_reward), RewardSpec("format", format_reward)]


def r1_specs(language_weight: float = 1.0) -> list[RewardSpec]:
    """R1's reasoning RL stage: accuracy + format + language consistency."""
    return r1_zero_specs() + [RewardSpec("language", language_consistency_reward, language_weight)]


def _safe(fn, completion, problem) -> float:
    try:
        value = float(fn(completion, problem))
    except Exception:
        return 0.0
    return value if math.isfinite(value) else 0.0


def compute_rewards(completions: list[str], problems: list[Problem], specs: list[RewardSpec],
                    lengths: list[int] | None = None, max_len: int | None = None,
                    cache_len: int = 0, overlong_weight: float = 1.0,
                    workers: int = 1) -> tuple[list[float], dict[str, list[float]]]:
    """Total reward per sample and every unweighted component by name, for logging. With
    `lengths` (completion tokens) and `max_len`, DAPO's overlong penalty joins as "overlong".
    workers > 1 grades samples in threads (useful for code, whose sandbox waits on a child)."""
    if len(completions) != len(problems):
        raise ValueError("one problem per completion")

    def grade(i):
        return [_safe(s.fn, completions[i], problems[i]) for s in specs]

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(grade, range(len(completions))))
    else:
        rows = [grade(i) for i in range(len(completions))]
    components = {s.name: [row[j] for row in rows] for j, s in enumerate(specs)}
    total = [sum(s.weight * row[j] for j, s in enumerate(specs)) for row in rows]
    if lengths is not None and max_len is not None:
        components["overlong"] = [overlong_penalty(n, max_len, cache_len) for n in lengths]
        total = [t + overlong_weight * p for t, p in zip(total, components["overlong"])]
    return total, components
