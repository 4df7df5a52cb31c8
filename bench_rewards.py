"""How fast rewards.py grades, on one core: answers per second with p50/p99 latency for math
answers, and the sandbox's start-up cost per code answer.

    python bench_rewards.py [--n 3000] [--code 20]

Math answers are graded the way grpo.py calls them, accuracy_reward(completion, problem), on
generated problems. Each gold answer is graded against one correct rewrite and one wrong answer,
in three groups: plain numbers (the in-process fast path), other exact forms (fractions,
percentages, lists, polynomials; parsed, still in-process) and symbolic answers that need the sympy
worker. Result caches are cleared before each group, and the pairs are distinct.
"""

import argparse
import os
import statistics
import time
from fractions import Fraction

import rewards
import tasks


def completion(answer: str) -> str:
    return f"<think> working </think> <answer> {answer} </answer>"


def plain_cases(n):
    out = []
    for p in tasks.generate("arith", n, seed=1, n_operands=(2, 4), max_value=50):
        wrong = str(int(p.answer) + 1)
        out += [(completion(p.answer), p), (completion(wrong), p)]
    return out


def exact_cases(n):
    out = []
    for p in tasks.generate("fraction", n // 3, seed=2, n_operands=(2, 3)):
        q = Fraction(p.answer)
        out += [(completion(f"\\frac{{{q.numerator}}}{{{q.denominator}}}"), p),
                (completion(f"{float(q):.3f}"), p)]  # rounded: wrong unless exact
    for p in tasks.generate("quadratic", min(n // 3, 250), seed=3):
        roots = p.answer.split(", ")
        out += [(completion(", ".join(reversed(roots))), p), (completion(roots[0] + ", 0"), p)]
    for p in tasks.generate("simplify", n // 3, seed=4):
        out += [(completion(p.answer.replace(" ", "")), p), (completion(p.answer + " + 1"), p)]
    return out


def symbolic_cases(n):
    out = []
    for p in tasks.generate("quadratic", n, seed=5, irrational=True):
        formula = p.meta["steps"][1][1]  # "(4 ± sqrt(124))/2": equal to the gold only symbolically
        low = p.answer.split(", ")[0]
        out += [(completion(formula.replace("±", "\\pm")), p), (completion(f"{low}, 0"), p)]
    return out


def bench_math(name, cases):
    rewards._result_cache.clear()
    rewards._parse_answer.cache_clear()
    times, correct = [], 0.0
    start = time.perf_counter()
    for text, problem in cases:
        t = time.perf_counter()
        correct += rewards.accuracy_reward(text, problem)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    q = statistics.quantiles(times, n=100)
    print(f"{name:22} {len(cases):6d} answers {len(cases) / total:10.0f} /s   "
          f"p50 {q[49] * 1e6:9.1f} us   p99 {q[98] * 1e6:10.1f} us   mean reward {correct / len(cases):.2f}")


def bench_code(n):
    problems = tasks.generate("code", n, seed=6)
    trivial = tasks.Problem("", "", "code", tests=["assert f() == 1"])
    for label, cases in (("trivial (1 test)", [(completion("def f():\n    return 1\n"), trivial)] * n),
                         ("generated (5 tests)", [(tasks.render_completion(p), p) for p in problems])):
        times, passed = [], 0.0
        for text, problem in cases:
            t = time.perf_counter()
            passed += rewards.code_reward(text, problem)
            times.append(time.perf_counter() - t)
        print(f"sandbox {label:22} {len(cases):4d} answers   mean {statistics.mean(times) * 1e3:6.1f} ms   "
              f"p50 {statistics.median(times) * 1e3:6.1f} ms   max {max(times) * 1e3:6.1f} ms   "
              f"reward {passed / len(cases):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="gold answers per math group")
    parser.add_argument("--code", type=int, default=20, help="code answers per sandbox group")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):  # one core; the sympy worker inherits it
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    print(f"sandbox layers: {','.join(sorted(rewards.sandbox_layers()))}")
    rewards.warmup()
    bench_math("math: plain numbers", plain_cases(args.n))
    bench_math("math: exact forms", exact_cases(args.n))
    bench_math("math: symbolic (sympy)", symbolic_cases(max(args.n // 20, 20)))
    bench_code(args.code)


if __name__ == "__main__":
    main()
