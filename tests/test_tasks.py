"""tasks.py: deterministic generators with disjoint splits, gold answers that are right (checked by
the rewards and by sympy), worked solutions in English and Chinese, and the JSONL loader."""

import json
import re
from fractions import Fraction

import pytest
import sympy as sp

import rewards
from rewards import (accuracy_reward, code_reward, countdown_check, format_reward,
                     language_consistency_reward, math_equal)
from tasks import (GENERATORS, R1_ZERO_TEMPLATE, Problem, en_number, format_prompt, generate,
                   load_jsonl, make_dataset, render_completion, render_question, render_solution,
                   render_steps, split_key, split_of, zh_number)

MATH_TASKS = ["arith", "fraction", "linear", "quadratic", "simplify"]


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_generation_is_deterministic_by_seed(task):
    first, again, other = (generate(task, 12, seed=s) for s in (3, 3, 4))
    assert first == again
    assert [p.question for p in first] != [p.question for p in other]


def test_train_and_test_splits_are_disjoint_whatever_the_seed():
    for task in ("arith", "fraction", "linear", "countdown", "code"):
        train = {split_key(p) for seed in (0, 1) for p in generate(task, 100, seed)}
        test = {split_key(p) for seed in (0, 1, 2) for p in generate(task, 10, seed, split="test")}
        assert train and test and not train & test, task


def test_split_is_a_function_of_the_problem_text_alone():
    problems = generate("arith", 40, seed=0) + generate("arith", 10, seed=0, split="test")
    assert all(split_of(p) == ("test" if i >= 40 else "train") for i, p in enumerate(problems))
    same_text = Problem(problems[0].question, "0", task="other")
    assert split_of(same_text) == "train"


def test_about_a_tenth_of_problems_are_test():
    import random

    rng = random.Random(0)
    candidates = [GENERATORS["arith"](rng, n_operands=3, max_value=99) for _ in range(3000)]
    share = sum(split_of(p) == "test" for p in candidates) / len(candidates)
    assert 0.07 < share < 0.13


def test_countdown_split_ignores_the_order_of_the_numbers():
    p = generate("countdown", 1, seed=0)[0]
    shuffled = Problem("other wording", p.answer, "countdown", meta=dict(p.meta, numbers=p.meta["numbers"][::-1]))
    assert split_key(shuffled) == split_key(p)


def test_difficulty_knobs_shape_arithmetic():
    for p in generate("arith", 30, seed=0, n_operands=4, max_value=5, ops="+*"):
        numbers = [int(t) for t in re.findall(r"\d+", p.question)]
        assert len(numbers) == 4 and max(numbers) <= 5


def test_generate_refuses_more_problems_than_the_knobs_allow():
    with pytest.raises(ValueError, match="distinct"):
        generate("arith", 50, seed=0, n_operands=2, max_value=3, ops="+")


def test_arithmetic_and_fraction_answers_equal_their_expressions():
    # the question's expression, read by the reward's own parser, equals the gold answer
    problems = (generate("arith", 150, 0, n_operands=(2, 4), ops="+-*/")
                + generate("fraction", 150, 0, n_operands=(2, 3)))
    for p in problems:
        expression = re.fullmatch(r"What is (.*)\?", p.question).group(1)
        assert math_equal(expression, p.answer), (p.question, p.answer)


def _sympy(text):
    """Our own generated text -> sympy, through the reward's safe parser (no sympify)."""
    return rewards._to_sympy(rewards._parse_answer(rewards._normalize(text)), sp)


def _sympy_roots(text):
    tree = rewards._parse_answer(rewards._normalize(text))
    items = tree[3] if tree[0] == "seq" else (tree,)
    return {sp.nsimplify(rewards._to_sympy(t, sp)) for t in items}


def test_algebra_answers_agree_with_sympy():
    x = sp.Symbol("x")
    for p in generate("linear", 15, 0, both_sides=True, fractional=True) + generate("linear", 15, 1):
        lhs, rhs = re.fullmatch(r"Solve for x: (.*) = (.*)\.", p.question).groups()
        assert sp.solve(sp.Eq(_sympy(lhs), _sympy(rhs)), x) == [_sympy(p.answer)], p.question
    for irrational in (False, True):
        for p in generate("quadratic", 15, 0, irrational=irrational):
            poly = re.fullmatch(r"Solve (.*) = 0\. Give all solutions\.", p.question).group(1)
            assert set(sp.solve(_sympy(poly), x)) == _sympy_roots(p.answer), p.question
    for p in generate("simplify", 30, 0):
        given = re.fullmatch(r"(?:Expand|Simplify) (.*)\.", p.question).group(1)
        assert sp.cancel(_sympy(given) - _sympy(p.answer)) == 0, p.question


def test_countdown_gold_uses_each_number_once_and_hits_the_target():
    for p in generate("countdown", 100, 0, n_numbers=(3, 5)):
        assert countdown_check(p.answer, p.meta["numbers"], p.meta["target"]), p.answer


def test_code_gold_solutions_pass_their_tests_in_the_sandbox():
    from tasks import _CODE_TASKS

    for family in [t["name"] for t in _CODE_TASKS]:
        p = generate("code", 1, seed=0, families=[family])[0]
        assert len(p.tests) == 5
        assert code_reward(render_completion(p), p) == 1.0, p.answer


@pytest.mark.parametrize("task", MATH_TASKS + ["countdown"])
def test_rendered_completions_earn_full_accuracy_and_format(task):
    for p in generate(task, 25, seed=7):
        for lang in ("en", "zh"):
            text = render_completion(p, lang)
            assert format_reward(text) == 1.0
            assert accuracy_reward(text, p) == 1.0, (p.question, text)


def test_worked_solutions_end_with_the_answer():
    for p in generate("arith", 50, 0, n_operands=(2, 4)) + generate("fraction", 50, 0):
        assert Fraction(str(p.meta["steps"][-1][-1])) == Fraction(p.answer)


def test_tiny_arithmetic_problem_with_solution_is_short():
    for p in generate("arith", 100, 0, n_operands=(2, 4), max_value=20):
        for lang in ("en", "zh"):
            words = render_question(p, lang).split() + render_solution(p, lang, number_words=True).split()
            assert len(words) <= 60


def test_worked_solutions_come_in_english_and_chinese_script():
    for p in generate("arith", 20, 0) + generate("fraction", 20, 0) + generate("countdown", 10, 0):
        for words in (False, True):
            assert language_consistency_reward(render_solution(p, "en", words), lang="en") == 1.0
            assert language_consistency_reward(render_solution(p, "zh", words), lang="zh") == 1.0
    for p in generate("linear", 20, 0) + generate("quadratic", 20, 0) + generate("code", 5, 0):
        assert language_consistency_reward(render_solution(p, "en"), lang="en") == 1.0
        assert language_consistency_reward(render_solution(p, "zh"), lang="zh") > 0.5  # x is Latin
        assert render_question(p, "zh") != p.question


def test_number_words_in_both_languages():
    p = Problem("What is 3 + 5?", "8", meta={"steps": [["calc", 3, "+", 5, 8]]})
    assert render_steps(p, "en", number_words=True) == ["three plus five equals eight."]
    assert render_steps(p, "zh", number_words=True) == ["三 加 五 等于 八。"]
    assert render_steps(p, "zh") == ["3 加 5 等于 8。"]
    cases = {0: ("zero", "零"), 15: ("fifteen", "十五"), 105: ("one hundred five", "一百零五"),
             110: ("one hundred ten", "一百一十"), 1010: ("one thousand ten", "一千零一十"),
             10010: ("ten thousand ten", "一万零一十"), -42: ("negative forty-two", "负四十二"),
             12345678: ("twelve million three hundred forty-five thousand six hundred seventy-eight",
                        "一千二百三十四万五千六百七十八")}
    for n, (en, zh) in cases.items():
        assert (en_number(n), zh_number(n)) == (en, zh)
    with pytest.raises(ValueError):
        render_steps(p, "fr")


def test_r1_zero_template_wraps_the_question():
    prompt = format_prompt("What is 2 + 3?")
    assert prompt.startswith("A conversation between User and Assistant.")
    assert prompt.endswith("User: What is 2 + 3?. Assistant:")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in R1_ZERO_TEMPLATE
    assert format_prompt("{x}", "Q: {question} A:") == "Q: {x} A:"


def test_make_dataset_mixes_tasks_deterministically():
    spec = {"arith": 30, "linear": {"n": 10, "max_coef": 5}, "countdown": 5}
    data = make_dataset(spec, seed=0)
    assert sorted(p.task for p in data) == sorted(["arith"] * 30 + ["linear"] * 10 + ["countdown"] * 5)
    assert make_dataset(spec, seed=0) == data
    assert all(split_of(p) == "test" for p in make_dataset([("arith", 5)], seed=0, split="test"))


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_reads_gsm8k_and_math_answers(tmp_path):
    lines = [json.dumps({"question": "Q1", "answer": "Natalia sold 48/2 = 24 clips.\n#### 72"}),
             json.dumps({"prompt": "Q2", "answer": "so $\\boxed{\\frac{1}{\\sqrt{2}}}$."}),
             json.dumps({"problem": "Q3", "solution": "Thus \\boxed{5}.", "level": "Level 2"}),
             "",
             json.dumps({"question": "Q4", "answer": 7}),
             json.dumps({"question": "Q5", "answer": "def f(): return 1", "tests": ["assert f() == 1"]})]
    problems = load_jsonl(_write(tmp_path / "d.jsonl", lines))
    assert [p.answer for p in problems] == ["72", "\\frac{1}{\\sqrt{2}}", "5", "7", "def f(): return 1"]
    assert [p.kind for p in problems] == ["math"] * 4 + ["code"]
    assert problems[2].meta == {"level": "Level 2"} and problems.skipped == []


@pytest.mark.parametrize("bad", ["{not json", json.dumps(["a list"]), json.dumps({"question": "Q"}),
                                 json.dumps({"answer": "5"}), json.dumps({"question": "Q", "answer": " "}),
                                 json.dumps({"question": "Q", "answer": "\\boxed{1"}),
                                 json.dumps({"question": "Q", "answer": "1", "kind": "essay"})])
def test_a_bad_line_is_an_error_naming_its_line(tmp_path, bad):
    good = json.dumps({"question": "Q", "answer": "1"})
    path = _write(tmp_path / "d.jsonl", [good, good, bad, good])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3:")):
        load_jsonl(path)


def test_lenient_loading_skips_and_counts_bad_lines(tmp_path):
    good = json.dumps({"question": "Q", "answer": "1"})
    path = _write(tmp_path / "d.jsonl", [good, "{oops", good, json.dumps({"q": 1})])
    with pytest.warns(UserWarning, match="skipped 2 bad lines"):
        problems = load_jsonl(path, lenient=True)
    assert len(problems) == 2 and problems.skipped == [2, 4]
