"""rewards.py: answers judged right, rewards that cannot be gamed, and model output that cannot
hurt the host (R1 section 2.2.2's rule rewards, run on untrusted text)."""

import math
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rewards
from rewards import (RewardSpec, SandboxLimits, accuracy_reward, code_reward, compute_rewards,
                     countdown_check, countdown_reward, extract_answer, extract_code, format_reward,
                     language_consistency_reward, math_equal, overlong_penalty, r1_specs,
                     r1_zero_specs, run_tests)
from tasks import Problem

T, F = True, False
# (prediction, gold, equal?) covering every form math_equal reads, with the traps the issue names
PAIRS = [
    # integers
    ("42", "42", T), ("-7", "-7", T), ("+5", "5", T), ("007", "7", T), ("42", "43", F),
    ("-3", "3", F), ("0", "-0", T), ("1000000", "10^6", T), ("2^{10}", "1024", T),
    ("3!", "6", T), ("10!", "3628800", T), ("5", "5.0", T), ("5.00", "5", T), ("5.", "5", T),
    # decimals and fractions compare exactly: 0.333 is not 1/3
    ("0.5", "1/2", T), ("0.333", "1/3", F), ("0.3333333333", "1/3", F), ("1/3", "2/6", T),
    ("\\frac{2}{4}", "\\frac{1}{2}", T), ("\\dfrac{3}{4}", "0.75", T), ("\\tfrac{3}{4}", "3/4", T),
    ("\\frac12", "0.5", T), ("\\frac{1}{2}", "0.51", F), ("-\\frac{1}{2}", "-0.5", T),
    ("\\frac{-1}{2}", "-1/2", T), (".5", "0.5", T), ("1.25", "5/4", T), ("2\\frac{1}{2}", "5/2", T),
    ("-2\\frac{1}{2}", "-5/2", T), ("3/4", "4/3", F), ("\\frac{1}{3}+\\frac{1}{6}", "1/2", T),
    ("0.1+0.2", "0.3", T), ("1.50", "3/2", T), ("3/2", "1.05", F), ("2^{-1}", "0.5", T),
    ("-(-3)", "3", T),
    # thousands separators: 1,000 is 1000
    ("1,000", "1000", T), ("1,000,000", "1000000", T), ("1{,}000", "1000", T),
    ("1\\,000", "1000", T), ("12,345.5", "12345.5", T), ("1,000", "1", F), ("$1,000", "1000", T),
    ("\\$5", "5", T),
    # percentages: a % on one side only may be read as a fraction or as the bare number
    ("50%", "0.5", T), ("50\\%", "50", T), ("50%", "50%", T), ("0.5%", "50%", F), ("25%", "1/4", T),
    ("25%", "0.025", F), ("12.5\\%", "0.125", T), ("10\\%", "0.1", T),
    # scientific notation
    ("1e3", "1000", T), ("1.5e-3", "0.0015", T), ("1.5E3", "1500", T), ("1.5\\times 10^{3}", "1500", T),
    ("2 \\cdot 10^{-2}", "0.02", T), ("6.02\\times10^{23}", "602000000000000000000000", T),
    ("1e3", "100", F),
    # LaTeX
    ("\\sqrt{4}", "2", T), ("\\sqrt{8}", "2\\sqrt{2}", T), ("\\sqrt{2}/2", "1/\\sqrt{2}", T),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", T), ("\\sqrt{2}", "1.41421356237", F),
    ("\\sqrt[3]{27}", "3", T), ("\\sqrt{12}", "3\\sqrt{2}", F), ("2\\pi", "\\pi+\\pi", T),
    ("\\pi", "3.14159", F), ("\\pi r^2", "r^2\\pi", T), ("\\frac{\\pi}{2}", "\\pi/2", T),
    ("3 \\times 4", "12", T), ("3\\cdot 4", "12", T), ("12 \\div 4", "3", T),
    ("\\left(\\frac{1}{2}\\right)^2", "1/4", T), ("\\left[1,2\\right]", "[1,2]", T),
    ("\\text{5}", "5", T), ("5\\text{ cm}", "5", T), ("10\\text{ inches}", "10", T),
    ("\\text{(B)}", "B", T), ("\\text{(B)}", "C", F), ("90^\\circ", "90", T), ("90^{\\circ}", "90", T),
    ("\\$3.50", "3.5", T), ("\\displaystyle\\frac{1}{2}", "0.5", T), ("x^{2}", "x^2", T),
    ("e^{i\\pi}", "-1", T), ("e^{0}", "1", T), ("\\log_2 8", "3", T), ("\\ln e", "1", T),
    ("\\sin^2 x + \\cos^2 x", "1", T), ("\\sin(\\pi/6)", "1/2", T), ("\\cos(0)", "1", T),
    ("\\tan(\\pi/4)", "2", F), ("\\infty", "\\infty", T), ("-\\infty", "\\infty", F),
    ("\\boxed{7}", "7", T), ("$\\frac{1}{2}$", "0.5", T), ("\\(3\\)", "3", T), ("\u22125", "-5", T),
    ("\u03c0", "\\pi", T), ("\u221a2", "\\sqrt{2}", T), ("2\u00d73", "6", T), ("4^{1/2}", "2", T),
    ("8^{2/3}", "4", T), ("(-8)^{1/3}", "-2", F),
    # equations: "x = 5" answers "5"
    ("x=5", "5", T), ("x = -3", "-3", T), ("5", "x=5", T), ("y = 2x+1", "y=1+2x", T),
    ("y=2x+1", "y=2x-1", F), ("x=5", "6", F),
    # tuples and points are ordered: (1,2) is not (2,1)
    ("(1,2)", "(1,2)", T), ("(1,2)", "(2,1)", F), ("(1, 2)", "\\left(1,2\\right)", T),
    ("(0.5, 3)", "(\\frac{1}{2}, 3)", T), ("(1,2,3)", "(1,2)", F), ("(1,2)", "[1,2]", F),
    ("(-1, \\sqrt{2})", "(-1, 2^{1/2})", T), ("(a, b)", "(b, a)", F),
    # sets and bare lists are not: {1,2} is {2,1}
    ("\\{1,2\\}", "\\{2,1\\}", T), ("\\{1,2\\}", "\\{1,2,3\\}", F), ("\\{1,1,2\\}", "\\{1,2\\}", T),
    ("1, 2", "2, 1", T), ("-3, 2", "2, -3", T), ("1, 2", "\\{1, 2\\}", T), ("\\emptyset", "\\{\\}", T),
    ("\\emptyset", "\\{0\\}", F), ("1 \\pm \\sqrt{2}", "1+\\sqrt{2}, 1-\\sqrt{2}", T), ("2, 3", "2, 4", F),
    ("3, 3", "3", T), ("\\{x, y\\}", "\\{y, x\\}", T),
    # intervals keep their brackets
    ("[1,2)", "[1,2)", T), ("[1,2)", "[1,2]", F), ("(1,2]", "[1,2]", F), ("(-\\infty, 0)", "(-\\infty,0)", T),
    ("(-\\infty, 0]", "(-\\infty,0)", F), ("(0, \\infty)", "(0, \\infty)", T), ("[0.5, 1]", "[\\frac{1}{2}, 1]", T),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(2, \\infty) \\cup (-\\infty, 1)", T),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(-\\infty, 1) \\cup [2, \\infty)", F),
    # symbolic expressions: equal when the difference is identically zero
    ("x^2-1", "(x-1)(x+1)", T), ("x^2+1", "(x+1)^2", F), ("2x+3x", "5x", T), ("(x+1)^2", "x^2+2x+1", T),
    ("\\frac{x^2-1}{x-1}", "x+1", T), ("\\frac{1}{x}+\\frac{1}{y}", "\\frac{x+y}{xy}", T), ("x y", "yx", T),
    ("a^2-b^2", "(a-b)(a+b)", T), ("a^2-b^2", "(a-b)^2", F), ("x^3", "x*x*x", T), ("2^x \\cdot 2^x", "4^x", T),
    ("\\sqrt{x^2}", "x", F), ("x_1 + x_2", "x_2 + x_1", T), ("x_1", "x_2", F), ("\\frac{x}{2}", "0.5x", T),
    ("0.333x", "x/3", F), ("\\alpha+\\beta", "\\beta+\\alpha", T), ("e^{2x}", "(e^x)^2", T),
    ("\\sin(2x)", "2\\sin x\\cos x", T), ("(x+1)^{64}", "(1+x)^{64}", T), ("(x+1)^{20}", "(x+1)^{19}(x+1)", T),
    ("x^2 - 5x + 6", "(x-2)(x-3)", T), ("x^2 - 5x + 6", "(x-2)(x+3)", F),
    # text answers
    ("Yes", "yes", T), ("\\text{Monday}", "Monday", T), ("even", "odd", F), ("No", "yes", F),
    # complex numbers
    ("3+4i", "4i+3", T), ("i^2", "-1", T), ("(1+i)^2", "2i", T), ("3-4i", "3+4i", F),
    # anything unreadable is wrong
    ("", "5", F), ("5", "", F), ("abc+", "5", F), ("\\frac{1}{", "0.5", F), ("\\unknown{5}", "5", F),
    ("1/0", "5", F), ("2 3", "23", F),
    # more near misses
    ("1/2", "2", F), ("0.25", "1/5", F), ("\\frac{2}{3}", "0.667", F), ("1e-3", "0.01", F),
    ("(1,2)", "\\{1,2\\}", F), ("x^2", "2x", F), ("\\sqrt{3}", "3^{1/3}", F), ("e", "2.718", F),
]


@pytest.fixture(scope="module", autouse=True)
def sympy_worker():
    rewards.warmup()  # the worker's cold start is not part of any answer's time limit


def test_the_table_has_at_least_150_pairs():
    assert len(PAIRS) >= 150 and sum(1 for *_, eq in PAIRS if not eq) >= 50


@pytest.mark.parametrize("pred, gold, equal", PAIRS, ids=[f"{p!r}~{g!r}" for p, g, _ in PAIRS])
def test_math_equal_table(pred, gold, equal):
    assert math_equal(pred, gold) is equal
    assert math_equal(gold, pred) is equal  # equivalence is symmetric


def test_extract_answer_takes_the_last_answer_tag_then_the_last_box():
    assert extract_answer("<answer> 1 </answer> then <answer>2</answer>") == "2"
    assert extract_answer("no tags, \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("<answer>\\boxed{3}</answer> \\boxed{4}") == "\\boxed{3}"
    assert extract_answer("\\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert extract_answer("\\boxed 5 done") == "5"
    assert extract_answer("<answer> unclosed \\boxed{7}") == "7"
    for nothing in ("plain text", "\\boxed{unbalanced", "", None, 42):
        assert extract_answer(nothing) is None


def test_format_reward_requires_think_then_answer_and_nothing_else():
    good = "<think> 2 + 3 = 5 </think> <answer> 5 </answer>"
    assert format_reward(good) == 1.0
    assert format_reward("\n <think>a\nb</think>\n\n<answer>5</answer>\n") == 1.0
    for bad in [good + "\nextra text",  # a MULTILINE-anchored regex would accept this
                "preamble " + good,
                "<answer> 5 </answer> <think> x </think>",
                "<think> a </think> <think> b </think> <answer> 5 </answer>",
                "<think> a </think> <answer> 5 </answer> <answer> 6 </answer>",
                "<think> a <answer> 5 </answer> </think>",
                "<think>  </think> <answer> 5 </answer>",
                "<think> a </think> <answer>   </answer>",
                "<think> a </think> x <answer> 5 </answer>",
                "", None]:
        assert format_reward(bad) == 0.0, bad


def test_partial_format_credit_is_per_tag_and_below_full():
    assert format_reward("<think> a </think> <answer> 5", partial=True) == pytest.approx(0.6)
    assert format_reward("<think> a </think> <answer> 5 </answer> tail", partial=True) == pytest.approx(0.8)
    assert format_reward("<think> a </think> <answer> 5 </answer>", partial=True) == 1.0
    assert format_reward("nothing", partial=True) == 0.0


def test_language_consistency_is_the_share_of_target_script_words():
    assert language_consistency_reward("<think> three plus five is eight </think>", lang="en") == 1.0
    assert language_consistency_reward("<think> 三加五等于八 </think>", lang="zh") == 1.0
    assert language_consistency_reward("<think> 三加五等于八 </think>", lang="en") == 0.0
    # each Han character is a word: 4 of 6 words here are Latin
    assert language_consistency_reward("<think> so 三加 then x y </think>", lang="en") == pytest.approx(4 / 6)
    assert language_consistency_reward("only this counts <think> 三 </think>", lang="zh") == 1.0
    assert language_consistency_reward("no think block at all", lang="en") == 1.0
    assert language_consistency_reward("<think> привет мир hello </think>", lang="en") == pytest.approx(1 / 3)


def test_an_empty_chain_of_thought_earns_no_language_reward():
    for text in ("<think></think><answer>5</answer>", "<think> 3 + 5 = 8 !!! </think>", "", None):
        assert language_consistency_reward(text, lang="en") == 0.0


def test_language_defaults_to_the_problem_and_rejects_unknown_languages():
    zh = Problem("q", "1", meta={"lang": "zh"})
    assert language_consistency_reward("<think> 三 </think>", zh) == 1.0
    assert language_consistency_reward("<think> three </think>", Problem("q", "1")) == 1.0
    with pytest.raises(ValueError):
        language_consistency_reward("x", lang="klingon")


def test_countdown_needs_each_number_exactly_once_and_the_target():
    nums, target = [3, 7, 25], 46
    assert countdown_check("25 + 3 * 7", nums, target)
    assert countdown_check("3 \\times 7 + 25 = 46", nums, target)
    assert countdown_check("(7 * 3) + 25", nums, target)
    for bad in ["25 + 21", "25 + 3 * 7 + 0", "25 + 3 * 7 * 1", "25 + 3 * 7 = 47", "3 * 7 + 25 + 3 - 3",
                "-3 * -7 + 25", "25 + 3 ** 7", "46", "25 + 3 * 7 / 0", "__import__('os')", "2.5e1 + 3 * 7",
                "25 + 3 * 7" + " " * 300, None]:
        assert not countdown_check(bad, nums, target), bad
    p = Problem("q", "25 + 3 * 7", "countdown", meta={"numbers": nums, "target": target})
    assert countdown_reward("<think> . </think> <answer> 3*7+25 </answer>", p) == 1.0
    assert accuracy_reward("<think> . </think> <answer> 3*7+24 </answer>", p) == 0.0


def test_overlong_penalty_is_dapo_soft_punishment():
    assert overlong_penalty(100, max_len=1000, cache_len=200) == 0.0
    assert overlong_penalty(800, max_len=1000, cache_len=200) == 0.0
    assert overlong_penalty(900, max_len=1000, cache_len=200) == pytest.approx(-0.5)
    assert overlong_penalty(1000, max_len=1000, cache_len=200) == pytest.approx(-1.0)
    assert overlong_penalty(5000, max_len=1000, cache_len=200) == -1.0
    assert overlong_penalty(1000, max_len=1000, cache_len=0) == 0.0
    assert overlong_penalty(1001, max_len=1000, cache_len=0) == -1.0


def test_compute_rewards_weights_components_and_logs_each():
    p = Problem("What is 2 + 3?", "5")
    completions = ["<think> two plus three is five </think> <answer> 5 </answer>",
                   "<think> two plus three is six </think> <answer> 6 </answer>",
                   "the answer is \\boxed{5}"]
    total, parts = compute_rewards(completions, [p] * 3, r1_zero_specs())
    assert parts == {"accuracy": [1.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0]}
    assert total == [2.0, 1.0, 1.0]
    total, parts = compute_rewards(completions, [p] * 3, r1_specs(language_weight=0.5),
                                   lengths=[10, 950, 2000], max_len=1000, cache_len=100, workers=2)
    assert parts["overlong"] == [0.0, pytest.approx(-0.5), -1.0]
    assert total == pytest.approx([2.5, 1.0, 0.5])


def test_a_failing_reward_function_scores_zero_instead_of_raising():
    def broken(completion, problem):
        raise RuntimeError("boom")

    def not_finite(completion, problem):
        return float("nan")

    total, parts = compute_rewards(["x"], [Problem("q", "1")],
                                   [RewardSpec("broken", broken), RewardSpec("nan", not_finite, 2.0)])
    assert total == [0.0] and parts == {"broken": [0.0], "nan": [0.0]}
    with pytest.raises(ValueError):
        compute_rewards(["a", "b"], [Problem("q", "1")], r1_zero_specs())


# Adversarial answers: every one wrong, fast, and nothing executed --------------------------------

MARKER = f"/tmp/r1_pwned_{uuid.uuid4().hex}"
ADVERSARIAL = [
    f"__import__('os').system('touch {MARKER}')",
    f"__import__(\"os\").popen(\"touch {MARKER}\")",
    "().__class__.__bases__[0].__subclasses__()",
    "x.__class__.__mro__",
    "lambda: __import__('os')",
    "(lambda x: x)(1)",
    "exec('1')",
    "9**9**9**9",
    "9^{9^{9^{9}}}",
    "10^10^10^10",
    "10^{10^{10^{10}}}",
    "2^{2^{2^{2^{2^{2}}}}}",
    "x^{1000000}",
    "(x+1)^{100000}",
    "\\sqrt{10^{100000}}",
    "1e999999999",
    "((((3!)!)!)!)",
    "100000!",
    "(10^{100})!",
    "\\pi^{10^{10}}",
    "\\sin(10^{10^{10}})",
    "(" * 10_000 + "1" + ")" * 10_000,
    "\\sqrt{" * 300 + "2" + "}" * 300,
    "-" * 900 + "1",
    "1" * 1_000_000,
    "x" * 1_000_000,
    "\x00", "5\x00", "\ud800", "\udfff5", "1\ud83d",
    "\\frac{1}{", "\\sqrt{", "}{", "\\left(", "^^^", "\\frac{\\frac{\\frac{", "$$$", "\\\\\\",
    "\\begin{pmatrix}1\\end{pmatrix}", "\\boxed{\\boxed{", "{" * 500, "1/" * 300 + "1",
]


@pytest.mark.parametrize("answer", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_answer_is_wrong_fast_and_runs_nothing(answer):
    start = time.monotonic()
    assert math_equal(answer, "1", timeout=2.0) is False
    assert math_equal("1", answer, timeout=2.0) is False
    problem = Problem("q", "1")
    assert accuracy_reward(f"<think> x </think> <answer>{answer}</answer>", problem) == 0.0
    assert time.monotonic() - start < 6.5  # three calls, 2 s limit each
    assert not os.path.exists(MARKER)


def test_a_one_megabyte_completion_is_graded_quickly():
    text = "<think>" + "let me think. " * 80_000 + "</think> <answer>" + "9" * 1_000_000 + "</answer>"
    start = time.monotonic()
    p = Problem("q", "9")
    assert accuracy_reward(text, p) == 0.0 and format_reward(text) == 1.0
    assert 0.0 < language_consistency_reward(text, lang="en") <= 1.0
    assert countdown_reward(text, Problem("q", "1", "countdown", meta={"numbers": [1], "target": 1})) == 0.0
    assert time.monotonic() - start < 3.0


def test_symbolic_time_limit_holds_off_the_main_thread():
    # equal, but sympy cannot settle it quickly; signal.alarm could not interrupt it from a thread
    slow = ("(\\sin x + \\cos x)^{30}(\\sin y+\\cos y)^{30}",
            "(\\sqrt{2}\\sin(x + \\pi/4))^{30}(\\sqrt{2}\\cos(y - \\pi/4))^{30}")
    result = {}

    def grade():
        start = time.monotonic()
        result["equal"] = math_equal(*slow, timeout=0.5)
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join(timeout=30)
    assert result == {"equal": False, "seconds": pytest.approx(0.5, abs=0.4)}
    assert math_equal("\\sqrt{8}", "2\\sqrt{2}")  # a fresh worker takes over


def test_concurrent_grading_from_threads_agrees_with_serial():
    sample = PAIRS[::3]
    results = [None] * len(sample)

    def grade(i):
        results[i] = math_equal(sample[i][0], sample[i][1])

    threads = [threading.Thread(target=grade, args=(i,)) for i in range(len(sample))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [eq for *_, eq in sample]


# Code sandbox ---------------------------------------------------------------------------------

LAYERS = rewards.sandbox_layers()
KERNEL = {"netns", "mountns", "readonly_fs", "tmpfs_workdir", "pidns", "uid", "rlimits"}
needs_kernel_layers = pytest.mark.skipif(not KERNEL <= LAYERS,
                                         reason=f"needs root and namespaces; have {sorted(LAYERS)}")
GUARDS = [True, pytest.param(False, marks=needs_kernel_layers)]  # Python guards on, and kernel alone


def _code(body: str) -> str:
    return f"<think> plan </think> <answer>\n```python\n{body}```\n</answer>"


def test_running_as_root_gives_every_kernel_layer():
    if os.geteuid() != 0:
        pytest.skip("not root")
    assert KERNEL | {"no_new_privs", "proc", "stdlib"} <= LAYERS


def test_code_reward_is_the_fraction_of_tests_passed():
    p = Problem("square", "", "code", tests=["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == 1",
                                             "assert sq(0) == 0"])
    assert code_reward(_code("def sq(x):\n    return x * x\n"), p) == 1.0
    assert code_reward(_code("def sq(x):\n    return abs(x) * 2\n"), p) == 0.5
    assert code_reward(_code("import math\ndef sq(x):\n    return math.prod([x, x])\n"), p) == 1.0
    assert code_reward(_code("def sq(x) return x\n"), p) == 0.0  # syntax error
    assert code_reward("no code at all", p) == 0.0
    assert code_reward(_code("def sq(x):\n    return x * x\n"), Problem("q", "", "code", tests=[])) == 0.0


def test_sandboxes_run_concurrently_from_threads():
    p = Problem("double", "", "code", tests=["assert double(2) == 4", "assert double(-3) == -6"])
    good, bad = _code("def double(x):\n    return 2 * x\n"), _code("def double(x):\n    return x + 2\n")
    total, parts = compute_rewards([good, bad] * 3, [p] * 6, [RewardSpec("code", code_reward)], workers=6)
    assert parts["code"] == [1.0, 0.5] * 3


def test_extract_code_prefers_the_last_fenced_block_of_the_answer():
    text = "```python\nbad\n``` <answer> ```python\nfirst\n``` ```py\nsecond\n``` </answer>"
    assert extract_code(text) == "second\n"
    assert extract_code("<answer>def f(): pass</answer>") == "def f(): pass"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("nothing") is None


def test_a_rigged_equality_does_not_pass_value_tests():
    rigged = "class A:\n    def __eq__(self, other):\n        return True\n\ndef f():\n    return A()\n"
    p = Problem("q", "", "code", tests=["assert f() == 5", "assert f() == [1, 2]"])
    assert code_reward(_code(rigged), p) == 0.0


def test_printed_text_cannot_forge_results():
    forger = ("import os, sys\nfor i in range(3):\n    print(f'{i} ok')\n    os.write(1, f'{i} v \"5\"\\n'.encode())\n"
              "def f():\n    return 0\n")
    p = Problem("q", "", "code", tests=["assert f() == 5", "assert f() == 5", "assert f() > 3"])
    assert code_reward(_code(forger), p) == 0.0


def test_infinite_loop_is_stopped_at_the_wall_clock_limit():
    start = time.monotonic()
    result = run_tests("def f():\n    while True:\n        pass\n", ["assert f() == 1"], SandboxLimits(wall_s=1.0))
    assert result.passed == 0 and result.timed_out
    assert time.monotonic() - start < 5.0


def test_tests_passed_before_a_hang_still_count():
    code = "def f(x):\n    while x == 2:\n        pass\n    return x\n"
    result = run_tests(code, ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"], SandboxLimits(wall_s=1.0))
    assert (result.passed, result.total, result.timed_out) == (1, 3, True)


@needs_kernel_layers
def test_fork_bomb_is_contained():
    bomb = ("import os\ndef f():\n    while True:\n        try:\n            os.fork()\n"
            "        except OSError:\n            pass\n")
    start = time.monotonic()
    result = run_tests(bomb, ["assert f() == 1"], SandboxLimits(wall_s=1.0, python_guards=False))
    assert result.passed == 0 and time.monotonic() - start < 6.0
    assert rewards._uid_processes(result.uid) == []  # the pid namespace died with its init
    host = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, timeout=30)
    assert host.stdout.strip() == "42"


@needs_kernel_layers
def test_an_escaped_session_dies_with_the_sandbox():
    code = ("import os, time\ndef f():\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n"
            "    return 1\n")
    result = run_tests(code, ["assert f() == 1"], SandboxLimits(wall_s=2.0, python_guards=False))
    assert result.passed == 1
    assert rewards._uid_processes(result.uid) == []


@pytest.mark.parametrize("guards", GUARDS)
def test_memory_bomb_is_stopped(guards):
    bomb = "def f():\n    hoard = []\n    while True:\n        hoard.append(bytearray(64 << 20))\n"
    start = time.monotonic()
    result = run_tests(bomb, ["assert f() == 1"], SandboxLimits(wall_s=3.0, memory_mb=256, python_guards=guards))
    assert result.passed == 0 and time.monotonic() - start < 8.0
    assert result.details[0][0] in ("err", "missing")


@pytest.mark.parametrize("guards", GUARDS)
def test_writes_outside_the_work_directory_do_not_reach_the_host(tmp_path, guards):
    targets = [str(tmp_path / "pwned"), f"/tmp/r1_pwned_{uuid.uuid4().hex}", f"/root/r1_pwned_{uuid.uuid4().hex}",
               os.path.join(os.path.dirname(rewards.__file__), f"r1_pwned_{uuid.uuid4().hex}")]
    code = "import os\ndef write(path):\n    with open(path, 'w') as f:\n        f.write('x')\n    return os.path.exists(path)\n"
    tests = [f"assert write({t!r}) == True" for t in targets] + ["assert write('inside.txt') == True"]
    result = run_tests(code, tests, SandboxLimits(python_guards=guards))
    assert [d[0] for d in result.details] == ["err"] * len(targets) + ["v"]
    assert result.passed == 1  # writing in its own directory works
    for target in targets:
        assert not os.path.exists(target)


@pytest.mark.parametrize("guards", GUARDS)
def test_sockets_cannot_reach_the_host(guards):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        code = (f"import socket\ndef call():\n    with socket.create_connection(('127.0.0.1', {port}), timeout=1) as s:\n"
                f"        s.sendall(b'pwned')\n    return True\n")
        result = run_tests(code, ["assert call() == True"], SandboxLimits(wall_s=3.0, python_guards=guards))
        assert result.passed == 0
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):  # nothing ever connected
            server.accept()


@pytest.mark.parametrize("guards", GUARDS)
def test_parent_environment_secrets_are_not_readable(monkeypatch, guards):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("R1_TEST_SECRET", secret)
    code = ("import glob, os\ndef leak():\n    seen = repr(dict(os.environ))\n"
            "    for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n        try:\n"
            "            seen += open(path, 'rb').read().decode('latin-1')\n        except OSError:\n            pass\n"
            f"    return {secret[:16]!r} in seen\n")
    result = run_tests(code, ["assert leak() == False", "assert leak() == True"], SandboxLimits(python_guards=guards))
    assert result.details[0] == ("v", '"False"') and result.passed == 1


def test_without_a_uid_of_its_own_the_sandbox_falls_back_to_rlimits_and_guards(monkeypatch):
    monkeypatch.setattr(rewards, "_acquire_uid", lambda: None)  # what a non-root user gets
    ok = run_tests("def f():\n    return 1\n", ["assert f() == 1"])
    assert ok.passed == 1 and ok.uid is None
    assert {"rlimits", "python_guards"} <= set(ok.layers) and not KERNEL - {"rlimits"} & set(ok.layers)
    start = time.monotonic()
    loop = run_tests("def f():\n    while True:\n        pass\n", ["assert f() == 1"], SandboxLimits(wall_s=1.0))
    assert loop.passed == 0 and loop.timed_out and time.monotonic() - start < 5.0


def test_python_guards_refuse_subprocesses_and_ctypes():
    code = ("import subprocess, ctypes\ndef spawn():\n    return subprocess.run(['true']).returncode\n"
            "def dlopen():\n    return ctypes.CDLL(None) is not None\n")
    result = run_tests(code, ["assert spawn() == 0", "assert dlopen() == True"])
    assert result.passed == 0 and [d[0] for d in result.details] == ["err", "err"]


# Fuzzing: every reward is total, finite, in range and quick ------------------------------------

FRAGMENTS = ["\\frac{", "}", "{", "\\sqrt", "^", "9", "!", "(", ")", ",", "x", "\\pi", "e", ".", "%",
             "=", "\\pm", "\\{", "\\}", "\\cup", "[", "]", "-", "+", "*", "/", "1", "0", "10", "\\infty",
             "\\left(", "\\right)", "\\text{", "\\boxed{", "<answer>", "</answer>", "<think>", "</think>",
             " ", "\\sin", "i", "\\log_", "_", "三", "y", "2.5", "e3", "\\cdot", "\n", "```python\n", "```"]
TEXT = st.one_of(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
                 st.text(st.characters(exclude_categories=()), max_size=60))
GOLDS = ["42", "1/2", "\\frac{\\sqrt{3}}{2}", "x^2 - 1", "(1, 2)", "1, 2", "[0, \\infty)", "50\\%", "Yes"]
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(TEXT, st.sampled_from(GOLDS))
def test_math_equal_is_total_and_bounded(pred, gold):
    start = time.monotonic()
    assert math_equal(pred, gold, timeout=0.5) in (True, False)
    assert time.monotonic() - start < 2.0


@FUZZ
@given(TEXT, st.sampled_from(GOLDS), st.integers(-10, 10**6), st.booleans())
def test_every_reward_is_a_finite_float_in_its_range(completion, gold, length, partial):
    math_problem = Problem("q", gold)
    countdown = Problem("q", "1 + 2", "countdown", meta={"numbers": [1, 2], "target": 3})
    values = {
        "accuracy": (accuracy_reward(completion, math_problem), {0.0, 1.0}),
        "countdown": (accuracy_reward(completion, countdown), {0.0, 1.0}),
        "format": (format_reward(completion, partial=partial), (0.0, 1.0)),
        "language_en": (language_consistency_reward(completion, lang="en"), (0.0, 1.0)),
        "language_zh": (language_consistency_reward(completion, lang="zh"), (0.0, 1.0)),
        "overlong": (overlong_penalty(length, 4096, 512), (-1.0, 0.0)),
    }
    for name, (value, allowed) in values.items():
        assert isinstance(value, float) and math.isfinite(value), name
        if isinstance(allowed, set):
            assert value in allowed, name
        else:
            assert allowed[0] <= value <= allowed[1], name


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(["def f(x):\n", "    return x\n", "    return 1/0\n", "import os\n",
                                 "print('0 ok')\n", "f = 3\n", "    yield x\n", "\x00", "\ud800", "(((("]),
                max_size=6).map(lambda parts: _code("".join(parts))))
def test_code_reward_is_total_on_garbage(completion):
    p = Problem("q", "", "code", tests=["assert f(2) == 2", "assert f(3) == 3"])
    value = code_reward(completion, p, limits=SandboxLimits(wall_s=2.0))
    assert value in (0.0, 0.5, 1.0)
