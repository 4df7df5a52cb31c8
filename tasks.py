"""Verifiable tasks: problems whose answers a rule can check (DeepSeek-R1 section 2.2).

R1 learns to reason from rule rewards alone, so a Problem carries its gold answer and, in `kind`,
the rule that checks it: "math" (rewards.math_equal), "countdown" (an expression using each of
meta["numbers"] once that equals meta["target"]) or "code" (a function run against `tests`).
Generators (arith, fraction, linear, quadratic, simplify, countdown, code) are deterministic given
a seed, take difficulty knobs, and store a worked solution as steps that render in English or
Chinese (`render_steps`) for pretraining and the cold-start SFT. A problem is "test" when a hash
of its canonical text falls in the lowest 10%, whatever the seed, so no test problem can appear in
training data. load_jsonl reads user data (GSM8K "#### 42", MATH \\boxed{...}).
Simplifications: templated questions; algebra is built from chosen roots and factors with exact
integer arithmetic (sympy simplifies radicals; the tests check the answers with sympy); the code
tasks are a fixed menu of small functions with random constants and inputs.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from math import lcm

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {question}. Assistant:"
)
KINDS = ("math", "countdown", "code")
TEST_FRACTION = 0.1  # share of the hash space that is "test"
LANGS = ("en", "zh")


@dataclass
class Problem:
    question: str  # the bare question, English
    answer: str  # gold answer; for "code" the reference solution
    kind: str = "math"  # which rule grades it, one of KINDS
    task: str = ""  # generator name, or "jsonl"
    tests: list[str] | None = None  # "code" only: assert statements
    meta: dict = field(default_factory=dict)  # steps, question_zh, numbers/target, key, ...


def format_prompt(question: str, template: str = R1_ZERO_TEMPLATE) -> str:
    # replace, not str.format: user templates may contain other braces
    return template.replace("{question}", question.strip())


# Splits ----------------------------------------------------------------------------------------


def split_key(problem: Problem) -> str:
    """Canonical text that identifies a problem; several questions can share one (countdown)."""
    return " ".join(str(problem.meta.get("key", problem.question)).split())


def split_of(problem: Problem) -> str:
    """ "train" or "test", from a hash of split_key alone: no seed can move a problem across."""
    digest = hashlib.sha256(split_key(problem).encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64 else "train"


# Number words and step rendering ---------------------------------------------------------------

_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ZH_DIGITS = "零一二三四五六七八九"


def en_number(n: int) -> str:
    if n < 0:
        return "negative " + en_number(-n)
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        return _EN_TENS[n // 10] + ("-" + _EN_ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return _EN_ONES[n // 100] + " hundred" + (" " + en_number(rest) if rest else "")
    for value, name in ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")):
        if n >= value:
            rest = n % value
            return en_number(n // value) + " " + name + (" " + en_number(rest) if rest else "")
    raise AssertionError


def _zh_section(n: int) -> str:
    """0 < n < 10000, with one 零 for each run of inner zeros (1010 -> 一千零一十)."""
    out, gap = [], False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = n // value % 10
        if d == 0:
            gap = bool(out)
        else:
            if gap:
                out.append("零")
                gap = False
            out.append(_ZH_DIGITS[d] + unit)
    return "".join(out)


def zh_number(n: int) -> str:
    if n < 0:
        return "负" + zh_number(-n)
    if n < 10:
        return _ZH_DIGITS[n]
    if n < 20:  # 十五, not 一十五, at the front of a number
        return "十" + (_ZH_DIGITS[n % 10] if n % 10 else "")
    for value, unit in ((10**8, "亿"), (10**4, "万")):
        if n >= value:
            high, low = divmod(n, value)
            text = zh_number(high) + unit
            if low:
                text += ("零" if low < value // 10 else "") + (
                    zh_number(low) if low >= 10**4 else _zh_section(low))
            return text
    return _zh_section(n)


def _number_text(value, lang: str, words: bool) -> str:
    text = str(value)
    if not words:
        return text
    say = en_number if lang == "en" else zh_number
    if re.fullmatch(r"-?\d+", text):
        return say(int(text))
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", text)
    if m:
        sign, num, den = m.group(1), int(m.group(2)), int(m.group(3))
        if lang == "en":
            return ("negative " if sign else "") + f"{en_number(num)} over {en_number(den)}"
        return ("负" if sign else "") + f"{zh_number(den)}分之{zh_number(num)}"
    return text


_OP_WORDS = {"en": {"+": "plus", "-": "minus", "*": "times", "/": "divided by"},
             "zh": {"+": "加", "-": "减", "*": "乘", "/": "除以"}}

# key -> (English, Chinese); {0}, {1}... are the step's arguments after the key
_STEP_TEMPLATES = {
    "calc": ("{0} {op} {1} equals {2}.", "{0} {op} {1} 等于 {2}。"),
    "common": ("Write {0} as {1} and {2} as {3}.", "把 {0} 写成 {1}，把 {2} 写成 {3}。"),
    "rewrite": ("Write {0} as {1}.", "把 {0} 写成 {1}。"),
    "simplify": ("{0} simplifies to {1}.", "{0} 化简为 {1}。"),
    "reciprocal": ("Dividing by {0} is multiplying by {1}.", "除以 {0} 就是乘 {1}。"),
    "sub_both": ("Subtract {0} from both sides: {1}.", "两边同时减去 {0}：{1}。"),
    "add_both": ("Add {0} to both sides: {1}.", "两边同时加上 {0}：{1}。"),
    "div_both": ("Divide both sides by {0}: {1}.", "两边同时除以 {0}：{1}。"),
    "move_x": ("Move the x terms to the left: {0}.", "把含 x 的项移到左边：{0}。"),
    "factor": ("Factor: {0}.", "因式分解：{0}。"),
    "two_roots": ("So x = {0} or x = {1}.", "所以 x = {0} 或 x = {1}。"),
    "one_root": ("So x = {0}.", "所以 x = {0}。"),
    "discriminant": ("The discriminant is {0}.", "判别式等于 {0}。"),
    "formula": ("By the quadratic formula, x = {0}.", "由求根公式，x = {0}。"),
    "expand": ("Expand: {0}.", "展开：{0}。"),
    "combine": ("Combine like terms: {0}.", "合并同类项：{0}。"),
    "factor_num": ("Factor the numerator: {0}.", "分子因式分解：{0}。"),
    "cancel": ("Cancel {0}: {1}.", "约去 {0}：{1}。"),
}


def render_steps(problem: Problem, lang: str = "en", number_words: bool = False) -> list[str]:
    """The worked solution as sentences in `lang` ("en" or "zh"). With number_words, integers
    and fractions are spelled out (three plus five equals eight / 三 加 五 等于 八)."""
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, not {lang!r}")
    zh = lang == "zh"
    out = []
    for key, *args in problem.meta.get("steps") or []:
        if key == "say":  # free text: [en, zh]
            out.append(args[1] if zh else args[0])
            continue
        words = [_number_text(a, lang, number_words) for a in args]
        template = _STEP_TEMPLATES[key][1 if zh else 0]
        if key == "calc":
            out.append(template.format(words[0], words[2], words[3], op=_OP_WORDS[lang][args[1]]))
        else:
            out.append(template.format(*words))
    return out


solution_steps = render_steps


def render_question(problem: Problem, lang: str = "en") -> str:
    if lang == "zh":
        return problem.meta.get("question_zh", problem.question)
    return problem.question


def render_solution(problem: Problem, lang: str = "en", number_words: bool = False) -> str:
    return ("" if lang == "zh" else " ").join(render_steps(problem, lang, number_words))


def render_completion(problem: Problem, lang: str = "en", number_words: bool = False) -> str:
    """What a model should write after "Assistant:" in the R1-Zero template."""
    answer = f"\n{problem.answer}" if problem.kind == "code" else f" {problem.answer} "
    return f"<think> {render_solution(problem, lang, number_words)} </think> <answer>{answer}</answer>"


# Formatting helpers ----------------------------------------------------------------------------


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _poly(terms, var: str = "x") -> str:
    """[(coef, degree), ...] -> "3x^2 - x + 5", keeping terms in the order given."""
    out = []
    for coef, deg in terms:
        if coef == 0:
            continue
        mag = abs(coef)
        body = _frac(Fraction(mag)) if deg == 0 or mag != 1 else ""
        body += "" if deg == 0 else var if deg == 1 else f"{var}^{deg}"
        if not out:
            out.append(("-" if coef < 0 else "") + body)
        else:
            out.append((" - " if coef < 0 else " + ") + body)
    return "".join(out) or "0"


def _fmt(expr) -> str:
    """sympy expression -> plain text the tiny models and rewards.math_equal read: x^2 - 5x + 6."""
    s = str(expr).replace("**", "^")
    s = re.sub(r"(\d)\*(?=[a-z]\b|\()", r"\1", s)  # 2*x -> 2x, but 3*sqrt(3) stays
    return re.sub(r"([\w)])\*\(", r"\1(", s)  # (x - 1)*(x + 1) -> (x - 1)(x + 1)


def _paren(v) -> str:
    return f"({v})" if v < 0 else str(v)


def _pick(rng: random.Random, knob) -> int:
    """A knob is an int or an inclusive (low, high) range."""
    if isinstance(knob, (tuple, list)):
        return rng.randint(int(knob[0]), int(knob[1]))
    return int(knob)


def _nonzero(rng: random.Random, bound: int) -> int:
    return rng.choice([v for v in range(-bound, bound + 1) if v])


# Generators: each takes an rng and difficulty knobs and returns one Problem -------------------


def gen_arith(rng, n_operands=(2, 3), max_value=20, ops="+-*"):
    """Integer expression with precedence; "/" only where it divides exactly."""
    k = _pick(rng, n_operands)
    if not 2 <= k <= 6:
        raise ValueError("n_operands must be between 2 and 6")
    nums, opl = [rng.randint(1, max_value)], []
    chain = nums[0]  # value of the current product chain, so "/" can be made exact
    for _ in range(k - 1):
        op = rng.choice(ops)
        if op == "/":
            divisors = [d for d in range(2, max_value + 1) if chain % d == 0]
            if divisors:
                y = rng.choice(divisors)
                chain //= y
            else:
                op, y = "*", rng.randint(1, max_value)
                chain *= y
        else:
            y = rng.randint(1, max_value)
            chain = chain * y if op == "*" else y
        opl.append(op)
        nums.append(y)
    steps, terms, addops = [], [nums[0]], []
    for op, y in zip(opl, nums[1:]):  # products and quotients first
        if op in "*/":
            r = terms[-1] * y if op == "*" else terms[-1] // y
            steps.append(["calc", terms[-1], op, y, r])
            terms[-1] = r
        else:
            addops.append(op)
            terms.append(y)
    acc = terms[0]
    for op, y in zip(addops, terms[1:]):
        r = acc + y if op == "+" else acc - y
        steps.append(["calc", acc, op, y, r])
        acc = r
    expr = str(nums[0]) + "".join(f" {op} {y}" for op, y in zip(opl, nums[1:]))
    return Problem(f"What is {expr}?", str(acc), "math", "arith",
                   meta={"steps": steps, "question_zh": f"{expr} 等于多少？"})


def gen_fraction(rng, n_operands=2, max_den=9, ops="+-*/"):
    """Fraction arithmetic evaluated left to right, with common denominators and reduction."""
    k = _pick(rng, n_operands)
    if not 2 <= k <= 4:
        raise ValueError("n_operands must be between 2 and 4")

    def rand_frac():
        den = rng.randint(2, max_den)
        return Fraction(rng.randint(1, max_den), den)

    acc = rand_frac()
    expr, prev, steps = _frac(acc), None, []
    symbol = {"+": "+", "-": "-", "*": "×", "/": "÷"}
    for _ in range(k - 1):
        op, f = rng.choice(ops), rand_frac()
        if op in "*/" and prev in ("+", "-"):
            expr = f"({expr})"
        divisor = f"({_frac(f)})" if op == "/" and f.denominator != 1 else _frac(f)  # 1 ÷ (5/2)
        expr = f"{expr} {symbol[op]} {divisor}"
        prev = op
        if op in "+-":
            den = lcm(acc.denominator, f.denominator)
            a = f"{acc.numerator * den // acc.denominator}/{den}"
            b = f"{f.numerator * den // f.denominator}/{den}"
            if acc.denominator != den and f.denominator != den:
                steps.append(["common", _frac(acc), a, _frac(f), b])
            elif acc.denominator != den or f.denominator != den:
                steps.append(["rewrite", *((_frac(acc), a) if acc.denominator != den else (_frac(f), b))])
            left, right = a, b
            result = acc + f if op == "+" else acc - f
            raw = f"{result.numerator * den // result.denominator}/{den}"
        else:
            left = _frac(acc)
            if op == "/":
                steps.append(["reciprocal", _frac(f), _frac(1 / f)])
                f, op = 1 / f, "*"
            right = _frac(f)
            result = acc * f
            raw = f"{acc.numerator * f.numerator}/{acc.denominator * f.denominator}"
        steps.append(["calc", left, op, right, raw])
        if raw != _frac(result):
            steps.append(["simplify", raw, _frac(result)])
        acc = result
    return Problem(f"What is {expr}?", _frac(acc), "math", "fraction",
                   meta={"steps": steps, "question_zh": f"{expr} 等于多少？"})


def gen_linear(rng, max_coef=9, both_sides=False, fractional=False):
    """a x + b = c (or = c' x + d). With fractional, the solution need not be an integer."""
    a, b = _nonzero(rng, max_coef), rng.randint(-max_coef, max_coef)
    c2 = 0
    if both_sides:
        c2 = rng.choice([v for v in range(-max_coef, max_coef + 1) if v not in (0, a)])
    if fractional:
        d = rng.randint(-max_coef * max_coef, max_coef * max_coef)
        sol = Fraction(d - b, a - c2)
    else:
        sol = Fraction(rng.randint(-max_coef, max_coef))
        d = int((a - c2) * sol + b)
    assert a * sol + b == c2 * sol + d
    equation = f"{_poly([(a, 1), (b, 0)])} = {_poly([(c2, 1), (d, 0)])}"
    steps = []
    if c2:
        a -= c2
        steps.append(["move_x", f"{_poly([(a, 1), (b, 0)])} = {d}"])
    if b > 0:
        steps.append(["sub_both", b, f"{_poly([(a, 1)])} = {d - b}"])
    elif b < 0:
        steps.append(["add_both", -b, f"{_poly([(a, 1)])} = {d - b}"])
    if a != 1:
        steps.append(["div_both", a, f"x = {_frac(sol)}"])
    if not steps:
        steps.append(["one_root", _frac(sol)])
    return Problem(f"Solve for x: {equation}.", _frac(sol), "math", "linear",
                   meta={"steps": steps, "question_zh": f"解关于 x 的方程：{equation}。"})


def _linear_factor(root: int) -> str:
    return "x" if root == 0 else f"(x {'-' if root > 0 else '+'} {abs(root)})"


def gen_quadratic(rng, max_root=12, irrational=False):
    """x^2 + b x + c = 0 from chosen integer roots, or with an irrational pair of roots
    (simplified by sympy, e.g. sqrt(8) -> 2 sqrt(2))."""
    if not irrational:
        r1, r2 = sorted((rng.randint(-max_root, max_root), rng.randint(-max_root, max_root)))
        b, c = -(r1 + r2), r1 * r2
        poly = _poly([(1, 2), (b, 1), (c, 0)])
        if r1 == r2:
            factored = f"{_linear_factor(r1)}^2" if r1 else "x^2"
        else:
            first, second = sorted((r1, r2), key=lambda r: (r != 0, r))  # x(x - 3), not (x - 3)x
            factored = _linear_factor(first) + _linear_factor(second)
        steps = [["factor", f"{poly} = {factored}"],
                 ["two_roots", r1, r2] if r1 != r2 else ["one_root", r1]]
        answer = f"{r1}, {r2}" if r1 != r2 else str(r1)
    else:
        import sympy as sp

        while True:
            b, c = rng.randint(-max_root, max_root), rng.randint(-max_root * max_root, max_root)
            disc = b * b - 4 * c
            if disc > 0 and int(disc**0.5 + 0.5) ** 2 != disc:
                break
        poly = _poly([(1, 2), (b, 1), (c, 0)])
        roots = [(-b - sp.sqrt(disc)) / 2, (-b + sp.sqrt(disc)) / 2]
        steps = [["discriminant", f"{_paren(b)}^2 - 4*{_paren(c)} = {disc}"],
                 ["formula", f"({-b} ± sqrt({disc}))/2"],
                 ["two_roots", _fmt(roots[0]), _fmt(roots[1])]]
        answer = ", ".join(_fmt(r) for r in roots)
    equation = f"{poly} = 0"
    return Problem(f"Solve {equation}. Give all solutions.", answer, "math", "quadratic",
                   meta={"steps": steps, "question_zh": f"解方程 {equation}，写出所有解。"})


def gen_simplify(rng, max_coef=6, modes=("expand", "cancel", "combine")):
    """Expand a product, cancel a common factor, or combine like terms; answers are polynomials."""
    mode = rng.choice(modes)
    p, q = _nonzero(rng, max_coef), _nonzero(rng, max_coef)
    product = _poly([(1, 2), (p + q, 1), (p * q, 0)])  # (x + p)(x + q)
    factor_p, factor_q = _poly([(1, 1), (p, 0)]), _poly([(1, 1), (q, 0)])
    if mode == "expand":
        answer = product
        question = f"Expand ({factor_p})({factor_q})."
        question_zh = f"展开 ({factor_p})({factor_q})。"
        steps = [["expand", _poly([(1, 2), (q, 1), (p, 1), (p * q, 0)])], ["combine", answer]]
    elif mode == "cancel":
        answer = factor_q
        fraction = f"({product})/({factor_p})"
        question, question_zh = f"Simplify {fraction}.", f"化简 {fraction}。"
        steps = [["factor_num", f"{product} = ({factor_p})({factor_q})"],
                 ["cancel", factor_p, answer]]
    elif mode == "combine":
        r = rng.choice([v for v in range(-max_coef, max_coef + 1) if v not in (0, -p)])
        s = rng.randint(-max_coef, max_coef)
        answer = _poly([(p + r, 1), (q + s, 0)])
        text = _poly([(p, 1), (q, 0), (r, 1), (s, 0)])
        question, question_zh = f"Simplify {text}.", f"化简 {text}。"
        steps = [["combine", answer]]
    else:
        raise ValueError(f"unknown simplify mode {mode!r}")
    return Problem(question, answer, "math", "simplify",
                   meta={"steps": steps, "question_zh": question_zh})


def gen_countdown(rng, n_numbers=(3, 4), max_number=20, max_target=100):
    """Reach a target with + - * / using each given number once; the gold is one such expression,
    built so that every intermediate result is a positive integer."""
    prec = {"+": 1, "-": 1, "*": 2, "/": 2}
    for _ in range(1000):
        nums = [rng.randint(1, max_number) for _ in range(_pick(rng, n_numbers))]
        items = [(Fraction(v), str(v), 3) for v in nums]  # value, text, precedence (3 = atom)
        steps = []
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            a, b = items[i], items[j]
            op = rng.choice("+-*/")
            if op == "-" and a[0] <= b[0]:
                a, b = (b, a) if a[0] < b[0] else (a, b)
                op = "+" if a[0] == b[0] else op
            if op == "/" and (b[0] == 1 or a[0] % b[0] != 0):
                op = "*"
            value = {"+": a[0] + b[0], "-": a[0] - b[0], "*": a[0] * b[0], "/": a[0] / b[0]}[op]
            left = a[1] if a[2] >= prec[op] else f"({a[1]})"
            right = b[1] if b[2] > prec[op] or (b[2] == prec[op] and op in "+*") else f"({b[1]})"
            steps.append(["calc", int(a[0]), op, int(b[0]), int(value)])
            items = [it for n, it in enumerate(items) if n not in (i, j)]
            items.append((value, f"{left} {op} {right}", prec[op]))
        target = items[0][0]
        if 1 <= target <= max_target:
            shown = ", ".join(map(str, nums))
            return Problem(
                f"Using the numbers {shown} each exactly once, with + - * / and parentheses, "
                f"make {int(target)}.", items[0][1], "countdown", "countdown",
                meta={"numbers": nums, "target": int(target), "steps": steps,
                      "key": f"countdown {sorted(nums)} -> {int(target)}",
                      "question_zh": f"用 {'、'.join(map(str, nums))} 这几个数各一次，"
                                     f"通过 + - * / 和括号得到 {int(target)}。"})
    raise ValueError("no countdown target in range; raise max_target or max_number")


def _rand_str(rng, alphabet, lo, hi):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _rand_list(rng, lo, hi, low=-20, high=20):
    return [rng.randint(low, high) for _ in range(rng.randint(lo, hi))]


def _kth_largest(xs, k):
    return sorted(set(xs), reverse=True)[k - 1]


def _running(xs, op):
    out, acc = [], None
    for v in xs:
        acc = v if acc is None else op(acc, v)
        out.append(acc)
    return out


def _fib(n, a, b):
    for _ in range(n):
        a, b = b, a + b
    return a


def _to_base_digits_sum(n, base):
    total = 0
    while n:
        n, d = divmod(n, base)
        total += d
    return total


_ORDINAL = {1: ("largest", "最大"), 2: ("second largest", "第二大"), 3: ("third largest", "第三大")}

# Each code task: signature, parameters, statement (en, zh), solution template, reference function,
# input sampler and a one-line plan (en, zh). "{name}" fields are filled from the parameters.
_CODE_TASKS = [
    dict(name="sum_multiples", params=lambda r: {"k": r.randint(2, 12)},
         en="Write a Python function sum_multiples(n) that returns the sum of all integers i with "
            "0 <= i < n that are divisible by {k}.",
         zh="写一个 Python 函数 sum_multiples(n)，返回所有满足 0 <= i < n 且能被 {k} 整除的整数 i 之和。",
         code="def sum_multiples(n):\n    return sum(i for i in range(n) if i % {k} == 0)\n",
         ref=lambda p, n: sum(i for i in range(n) if i % p["k"] == 0),
         inputs=lambda r, p: (r.randint(0, 200),),
         plan=("Add up the numbers in range(n) that are divisible by {k}.",
               "把 range(n) 中能被 {k} 整除的数加起来。")),
    dict(name="count_char", params=lambda r: {"c": r.choice("abcdefghijklmnopqrstuvwxyz")},
         en="Write a Python function count_char(s) that returns how many times the letter '{c}' "
            "occurs in the string s.",
         zh="写一个 Python 函数 count_char(s)，返回字母 '{c}' 在字符串 s 中出现的次数。",
         code="def count_char(s):\n    return s.count('{c}')\n",
         ref=lambda p, s: s.count(p["c"]),
         inputs=lambda r, p: (_rand_str(r, "abcdefghijklmnopqrstuvwxyz" + p["c"] * 6, 0, 15),),
         plan=("Count the occurrences of '{c}' with str.count.", "用 str.count 数出 '{c}' 的个数。")),
    dict(name="clamp", params=lambda r: {"lo": r.randint(-20, 0), "hi": r.randint(1, 20)},
         en="Write a Python function clamp(x) that returns x limited to the range [{lo}, {hi}].",
         zh="写一个 Python 函数 clamp(x)，把 x 限制在区间 [{lo}, {hi}] 内并返回。",
         code="def clamp(x):\n    return max({lo}, min({hi}, x))\n",
         ref=lambda p, x: max(p["lo"], min(p["hi"], x)),
         inputs=lambda r, p: (r.randint(-40, 40),),
         plan=("Take the max with {lo} and the min with {hi}.", "先和 {hi} 取最小，再和 {lo} 取最大。")),
    dict(name="power_mod", params=lambda r: {"a": r.randint(2, 9), "m": r.randint(5, 50)},
         en="Write a Python function power_mod(n) that returns {a} to the power n, modulo {m}.",
         zh="写一个 Python 函数 power_mod(n)，返回 {a} 的 n 次方除以 {m} 的余数。",
         code="def power_mod(n):\n    return pow({a}, n, {m})\n",
         ref=lambda p, n: pow(p["a"], n, p["m"]),
         inputs=lambda r, p: (r.randint(0, 60),),
         plan=("Use pow with three arguments.", "用三个参数的 pow。")),
    dict(name="fib", params=lambda r: {"a": r.randint(0, 3), "b": r.randint(1, 4)},
         en="Write a Python function fib(n) for the sequence with fib(0) = {a}, fib(1) = {b} and "
            "fib(n) = fib(n - 1) + fib(n - 2).",
         zh="写一个 Python 函数 fib(n)，数列满足 fib(0) = {a}，fib(1) = {b}，"
            "fib(n) = fib(n - 1) + fib(n - 2)。",
         code="def fib(n):\n    a, b = {a}, {b}\n    for _ in range(n):\n        a, b = b, a + b\n"
              "    return a\n",
         ref=lambda p, n: _fib(n, p["a"], p["b"]),
         inputs=lambda r, p: (r.randint(0, 30),),
         plan=("Iterate n times, keeping the last two values.", "循环 n 次，保存最后两个值。")),
    dict(name="digit_sum", params=lambda r: {"base": r.randint(2, 10)},
         en="Write a Python function digit_sum(n) that returns the sum of the digits of the "
            "non-negative integer n written in base {base}.",
         zh="写一个 Python 函数 digit_sum(n)，返回非负整数 n 的 {base} 进制各位数字之和。",
         code="def digit_sum(n):\n    total = 0\n    while n:\n        n, d = divmod(n, {base})\n"
              "        total += d\n    return total\n",
         ref=lambda p, n: _to_base_digits_sum(n, p["base"]),
         inputs=lambda r, p: (r.randint(0, 10**6),),
         plan=("Repeatedly divmod by {base} and add the remainders.", "反复用 {base} 做 divmod，累加余数。")),
    dict(name="kth_largest", params=lambda r: {"k": r.randint(1, 3)},
         en="Write a Python function kth_largest(xs) that returns the {ordinal} distinct value in "
            "the list xs (it has at least {k} distinct values).",
         zh="写一个 Python 函数 kth_largest(xs)，返回列表 xs 中{ordinal_zh}的不同值（至少有 {k} 个不同值）。",
         code="def kth_largest(xs):\n    return sorted(set(xs), reverse=True)[{k} - 1]\n",
         ref=lambda p, xs: _kth_largest(xs, p["k"]),
         inputs=lambda r, p: (list(r.sample(range(-50, 50), p["k"])) + _rand_list(r, 0, 8),),
         plan=("Sort the distinct values in decreasing order and index.", "把不同的值从大到小排序后取下标。")),
    dict(name="running", params=lambda r: {"op": r.choice(["max", "min", "sum"])},
         en="Write a Python function running(xs) that returns a list whose i-th element is the "
            "{op} of xs[0], ..., xs[i].",
         zh="写一个 Python 函数 running(xs)，返回一个列表，第 i 个元素是 xs[0] 到 xs[i] 的 {op}。",
         code="def running(xs):\n    out = []\n    for v in xs:\n"
              "        out.append(v if not out else {combine})\n    return out\n",
         ref=lambda p, xs: _running(xs, {"max": max, "min": min, "sum": lambda a, b: a + b}[p["op"]]),
         inputs=lambda r, p: (_rand_list(r, 0, 10),),
         plan=("Keep a running {op} while scanning the list.", "扫描列表时维护当前的 {op}。")),
    dict(name="count_in", params=lambda r: {"chars": "".join(sorted(r.sample("aeiouxyz", r.randint(2, 5))))},
         en="Write a Python function count_in(s) that returns how many characters of s are one of "
            "'{chars}'.",
         zh="写一个 Python 函数 count_in(s)，返回 s 中属于 '{chars}' 的字符个数。",
         code="def count_in(s):\n    return sum(1 for ch in s if ch in '{chars}')\n",
         ref=lambda p, s: sum(1 for ch in s if ch in p["chars"]),
         inputs=lambda r, p: (_rand_str(r, "abcdefghijklmnopqrstuvwxyz", 0, 15),),
         plan=("Count the characters that appear in '{chars}'.", "数出属于 '{chars}' 的字符。")),
    dict(name="rotate", params=lambda r: {"k": r.randint(1, 5)},
         en="Write a Python function rotate(xs) that returns the list xs rotated left by {k} "
            "positions (wrapping around; the empty list stays empty).",
         zh="写一个 Python 函数 rotate(xs)，返回把列表 xs 循环左移 {k} 位的结果（空列表不变）。",
         code="def rotate(xs):\n    if not xs:\n        return []\n    k = {k} % len(xs)\n"
              "    return xs[k:] + xs[:k]\n",
         ref=lambda p, xs: xs[p["k"] % len(xs):] + xs[:p["k"] % len(xs)] if xs else [],
         inputs=lambda r, p: (_rand_list(r, 0, 9),),
         plan=("Slice at {k} modulo the length and swap the two parts.", "在 {k} 对长度取模处切开，交换两段。")),
]
_RUNNING_COMBINE = {"max": "max(out[-1], v)", "min": "min(out[-1], v)", "sum": "out[-1] + v"}


def _fill(template: str, params: dict) -> str:
    for name, value in params.items():
        template = template.replace("{" + name + "}", str(value))
    return template


def gen_code(rng, n_tests=5, families=None):
    """A small function to write; tests are `assert f(args) == expected` from a reference."""
    menu = [t for t in _CODE_TASKS if families is None or t["name"] in families]
    if not menu:
        raise ValueError(f"no code task among {families}")
    task = rng.choice(menu)
    params = task["params"](rng)
    if task["name"] == "kth_largest":
        params["ordinal"], params["ordinal_zh"] = _ORDINAL[params["k"]]
    if task["name"] == "running":
        params["combine"] = _RUNNING_COMBINE[params["op"]]
    tests, seen = [], set()
    for _ in range(50 * n_tests):
        args = task["inputs"](rng, params)
        call = f"{task['name']}({', '.join(map(repr, args))})"
        if call not in seen:
            seen.add(call)
            tests.append(f"assert {call} == {task['ref'](params, *args)!r}")
        if len(tests) == n_tests:
            break
    question = _fill(task["en"], params)
    plan_en, plan_zh = (_fill(t, params) for t in task["plan"])
    return Problem(question, _fill(task["code"], params), "code", "code", tests=tests,
                   meta={"steps": [["say", plan_en, plan_zh]], "question_zh": _fill(task["zh"], params),
                         "function": task["name"]})


GENERATORS = {
    "arith": gen_arith,
    "fraction": gen_fraction,
    "linear": gen_linear,
    "quadratic": gen_quadratic,
    "simplify": gen_simplify,
    "countdown": gen_countdown,
    "code": gen_code,
}


def generate(task: str, n: int, seed: int, split: str = "train", **difficulty) -> list[Problem]:
    """n distinct problems of one task in one split; the same arguments give the same list."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(GENERATORS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"{task}/{seed}/{split}/{sorted(difficulty.items())}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        problem = GENERATORS[task](rng, **difficulty)
        key = split_key(problem)
        if key not in seen and split_of(problem) == split:
            seen.add(key)
            out.append(problem)
    if len(out) == n:
        return out
    raise ValueError(f"could only make {len(out)} distinct {split} problems for {task!r} with "
                     f"{difficulty}; widen the difficulty knobs or ask for fewer")


def make_dataset(tasks, seed: int, split: str = "train") -> list[Problem]:
    """Mix generators: {"arith": 1000, "linear": {"n": 200, "max_coef": 5}} or a list of
    (task, n) / (task, n, knobs). Shuffled deterministically; duplicates across entries dropped."""
    entries = tasks.items() if isinstance(tasks, dict) else tasks
    out, seen = [], set()
    for entry in entries:
        task, spec = entry[0], entry[1]
        knobs = dict(entry[2]) if len(entry) > 2 else {}
        if isinstance(spec, dict):
            spec = dict(spec)
            n = spec.pop("n")
            knobs.update(spec)
        else:
            n = spec
        for problem in generate(task, n, seed, split, **knobs):
            if split_key(problem) not in seen:
                seen.add(split_key(problem))
                out.append(problem)
    random.Random(f"mix/{seed}/{split}").shuffle(out)
    return out


# User data sets --------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces allowed; None if absent or
    unbalanced. Also accepts the brace-less form \\boxed 5."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (6 if text.startswith("\\boxed", i) else 5)
    while j < len(text) and text[j] == " ":
        j += 1
    if j >= len(text):
        return None
    if text[j] != "{":
        m = re.match(r"[^\s$]+", text[j:])
        return m.group(0) if m else None
    k = match_brace(text, j)
    return text[j + 1:k] if k >= 0 else None


def match_brace(s: str, i: int) -> int:
    """Index of the brace closing s[i] == "{", or -1; \\{ and \\} are not braces."""
    depth = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def parse_gold_answer(raw: str) -> str:
    """GSM8K "... #### 42" -> "42"; MATH "... \\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}"."""
    if "####" in raw:
        return raw.rsplit("####", 1)[1].strip()
    if "\\boxed" in raw or "\\fbox" in raw:
        inner = last_boxed(raw)
        if inner is None:
            raise ValueError("unbalanced \\boxed{...} in answer")
        return inner.strip()
    return raw.strip()


class LoadedProblems(list):
    """The problems of a JSONL file; `skipped` lists the line numbers of bad lines that lenient
    loading left out."""

    skipped: list[int]


def _problem_from_record(record) -> Problem:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    question = next((record[k] for k in ("question", "prompt", "problem")
                     if isinstance(record.get(k), str) and record[k].strip()), None)
    if question is None:
        raise ValueError("missing 'question' (or 'prompt')")
    raw = record.get("answer", record.get("solution"))
    if raw is None or isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError("missing 'answer' (a string or a number)")
    answer = parse_gold_answer(str(raw))
    if not answer:
        raise ValueError("empty answer")
    tests = record.get("tests")
    if tests is not None and not (isinstance(tests, list) and all(isinstance(t, str) for t in tests)):
        raise ValueError("'tests' must be a list of strings")
    default = "code" if tests else "countdown" if {"numbers", "target"} <= record.keys() else "math"
    kind = record.get("kind", default)
    if kind not in KINDS:
        raise ValueError(f"'kind' must be one of {KINDS}")
    used = {"question", "prompt", "problem", "answer", "solution", "tests", "kind", "task"}
    meta = {k: v for k, v in record.items() if k not in used}
    return Problem(question, answer, kind, str(record.get("task", "jsonl")), tests, meta)


def load_jsonl(path, lenient: bool = False) -> LoadedProblems:
    """One JSON object per line with question|prompt|problem and answer|solution (optional kind,
    tests, task; other fields go to meta). A bad line raises ValueError naming path and line;
    with lenient=True it is skipped, recorded in .skipped and counted in a warning."""
    out = LoadedProblems()
    out.skipped = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                out.append(_problem_from_record(json.loads(line)))
            except (ValueError, TypeError) as e:
                if not lenient:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                out.skipped.append(lineno)
    if out.skipped:
        warnings.warn(f"{path}: skipped {len(out.skipped)} bad lines (first: {out.skipped[:5]})")
    return out
