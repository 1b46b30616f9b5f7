"""Rewards: accuracy on the last \\boxed{}, the reference format regex, robustness and time bounds."""
import random
import re
import threading
import time

import pytest

from megatron_papo.data.rewards import (
    RewardResult,
    clean_response,
    format_ok,
    get_reward_fn,
    grade_answer,
    last_boxed,
    papo_reward,
    parse_choices,
)

# The PAPO reference code's format check (EasyR1 math reward), the independent reference here.
REFERENCE_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)

RIGHT = [  # (answer inside \boxed{}, ground truth)
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"), ("\\dfrac{3}{4}", "0.75"),
    ("2.0", "2"), ("1,000", "1000"), ("x^2+2x+1", "(x+1)^2"), ("\\sqrt{8}", "2\\sqrt{2}"),
    ("30^\\circ", "30"), ("\\pi/2", "\\frac{\\pi}{2}"), ("$5$", "5"), ("5.", "5"), ("-3", "-3"),
    ("(B)", "B"), ("B.", "B"), ("b", "B"), ("B. 12 cm", "B"), ("A", "(A)"),
    ("Red", "red"), ("\\text{blue}", "Blue"), (" yellow ", "yellow"), ("circle.", "circle"),
    ("\\{1,2\\}", "\\{1,2\\}"), ("4", "4"), ("0.25", "\\boxed{\\frac{1}{4}}"),
    # Decisions, each against math-verify (MV) and the PAPO reference grader (mathruler's grade_answer, REF):
    # ° is the Unicode spelling of ^\circ, which both accept; both reject "120°" only because they do
    # not know the symbol, and grading one answer by its spelling would reward notation, not the math.
    ("120°", "120"), ("120", "120°"), ("120°", "120^\\circ"),
    # a bare "pi" is pi: REF turns \pi into "pi" and accepts; MV reads "pi" as p*i and rejects.
    ("pi", "\\pi"), ("\\pi", "pi"), ("2pi", "2\\pi"), ("pi/2", "\\frac{\\pi}{2}"),
    # scientific notation is the number: REF accepts (float("1e3") is 1000); MV reads e as Euler's number.
    ("1e3", "1000"), ("1000", "1e3"), ("1.5e-3", "0.0015"), ("6.02e23", "602000000000000000000000"),
    # several powers are fine as long as the exponents are small (both graders accept these)
    ("x^2+y^2", "y^2+x^2"), ("2^{10}", "1024"),
]
WRONG = [
    ("\\frac{1}{3}", "0.5"), ("0.51", "1/2"), ("3", "4"), ("(C)", "B"), ("A", "B"), ("der", "red"),
    ("12", "blue"), ("blue", "12"), ("x^2+1", "(x+1)^2"), ("", "0"), ("red circle", "red"),
    # REF rejects a factorial for an integer truth (it wants a strict match); factorials are screened here
    ("5!", "120"),
    # "pi" inside a word is not pi; "2e" is not scientific notation
    ("spin", "s\\pi n"), ("2e", "2"),
]


@pytest.mark.parametrize("pred,gold", RIGHT)
def test_right_answers(pred, gold):
    assert grade_answer(pred, gold)
    r = papo_reward(f"<think>working</think> The answer is \\boxed{{{pred}}}.", gold)
    assert r == RewardResult(1.0, 1.0, 1.0)


@pytest.mark.parametrize("pred,gold", WRONG)
def test_wrong_answers(pred, gold):
    assert not grade_answer(pred, gold)
    assert papo_reward(f"<think>working</think> \\boxed{{{pred}}}", gold) == RewardResult(0.1, 0.0, 1.0)


def test_multiple_choice_option_text():
    choices = parse_choices("Which colour is the ball?\nA. blue\nB. red\n(C) green\nD: yellow")
    assert choices == {"a": "blue", "b": "red", "c": "green", "d": "yellow"}
    assert grade_answer("red", "B", choices) and grade_answer("B", "red", choices)
    assert grade_answer("(C)", "green", choices) and grade_answer("Green", "C", choices)
    assert not grade_answer("blue", "B", choices) and not grade_answer("A", "red", choices)
    assert not grade_answer("red", "B")  # without the options the text cannot be matched to a letter
    assert parse_choices("no options here\nA. only one") is None


def test_last_boxed_wins_and_nested_braces():
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{{a}{b}} tail") == "{a}{b}"
    assert last_boxed("\\boxed{1} and \\boxed{2") is None  # the last one never closes
    assert last_boxed("no box") is None
    assert papo_reward("<think>a</think> \\boxed{2} no, \\boxed{3}", "3").accuracy == 1.0
    assert papo_reward("<think>a</think> \\boxed{3} no, \\boxed{2}", "3").accuracy == 0.0
    assert papo_reward("<think>a</think> \\boxed{\\frac{1}{2}}", "0.5").accuracy == 1.0


def test_format_reward_matches_reference_regex():
    cases = ["<think>x</think>\\boxed{1}", "<think></think>\\boxed{}", "<think>x</think> so \\boxed{1} done",
             "x<think>x</think>\\boxed{1}", "<think>x</think>", "<think>x\\boxed{1}", "<think>\\boxed{1}</think>",
             "<think>x</think>\\boxed{", "<think>x</think>\\boxed{}}", "", "\\boxed{1}<think>x</think>",
             "<think>a\n</think>\n\\boxed{\n1\n}\n", "<think><think></think></think>\\boxed{\\boxed{}"]
    pieces = ["<think>", "</think>", "\\boxed{", "}", "{", "x", " ", "\n", "<", "/", "think>", "\\boxed"]
    rng = random.Random(0)
    cases += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 9))) for _ in range(5000)]
    noise = lambda: "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))  # noqa: E731
    for _ in range(3000):  # the right layout with noise in between and key pieces dropped at random
        keys = [k if rng.random() > 0.15 else "" for k in ("<think>", "</think>", "\\boxed{", "}")]
        cases.append("".join(k + noise() for k in keys))
    hits = 0
    for s in cases:
        expected = REFERENCE_FORMAT.fullmatch(s) is not None
        assert format_ok(s) == expected, repr(s)
        hits += expected
    assert 100 < hits < len(cases) - 100  # both outcomes exercised
    # like the reference, spaces around tag characters are removed before the check
    for _ in range(3000):
        t = "".join(rng.choice(["<", ">", "/", " ", "\n\t", "a", "think"]) for _ in range(rng.randint(0, 12)))
        assert clean_response(t) == re.sub(r"\s*(<|>|/)\s*", r"\1", t), repr(t)
    assert clean_response("< think > a < /think > \\boxed{1}") == "<think>a</think>\\boxed{1}"
    assert papo_reward("< think > a < /think > \\boxed{1}", "1") == RewardResult(1.0, 1.0, 1.0)
    assert papo_reward("\\boxed{1}", "1") == RewardResult(0.9, 1.0, 0.0)


def test_registry():
    assert get_reward_fn("papo") is papo_reward
    exact = get_reward_fn("exact_match")
    assert exact("<think>a</think> \\boxed{Red}", "red") == RewardResult(1.0, 1.0, 1.0)
    assert exact("\\boxed{0.5}", "1/2") == RewardResult(0.0, 0.0, 0.0)  # strings only
    with pytest.raises(ValueError, match="unknown reward function 'f1'.*exact_match.*papo"):
        get_reward_fn("f1")


def test_grading_off_the_main_thread_is_bounded():
    from megatron_papo.data import rewards

    rewards._math_equal_cached.cache_clear()  # so the pairs below reach the helper process
    out = []
    worker = threading.Thread(target=lambda: out.extend([papo_reward("<think>a</think>\\boxed{1/2}", "0.5"),
                                                         papo_reward("<think>a</think>\\boxed{x^{2}}", "3")]))
    worker.start()
    worker.join(timeout=90)
    assert not worker.is_alive()
    assert [r.accuracy for r in out] == [1.0, 0.0]
    # an overrun kills the helper process and counts as wrong; the next call starts a fresh one
    # (a pair the helper has not cached: parsing it takes milliseconds, far longer than a 0 s wait)
    assert rewards._GRADER.equal("\\frac{7}{9}", "14/18", timeout_s=0.0) is False
    assert rewards._GRADER._proc is None
    assert rewards._GRADER.equal("1/2", "0.5", timeout_s=5.0) is True


def _adversarial(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind == 0:
        return "\\boxed{" * rng.randint(1, 1000)
    if kind == 1:
        d = rng.randint(1, 3000)
        return "<think>" + "{" * d + "</think>\\boxed{" + "{" * d + "1" + "}" * (d + 1)
    if kind == 2:
        return "<think>x</think>\\boxed{" + "9" * rng.randint(1, 5000) + "}"
    if kind == 3:
        return "\\boxed{" + "}" * rng.randint(1, 500) + "{" * rng.randint(1, 500)
    if kind == 4:
        return "\\boxed{" + "^".join(["10"] * rng.randint(2, 50)) + "}"
    if kind == 5:
        return "\\boxed{" + "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(0, 60))) + "}"
    if kind == 6:
        return "\\boxed{" + "\\frac{" * rng.randint(1, 200) + "1}{2}" * rng.randint(0, 200) + "}"
    if kind == 7:
        return "<think>" * rng.randint(1, 2000) + "</think>" * rng.randint(0, 2000) + "\\boxed{"
    if kind == 8:
        return "\\boxed{" + rng.choice(["1/0", "0/0", "\\infty", "\\sqrt{-1}", "x=", "=", "\\", "$$", "\\frac{}{}",
                                        "99!", "\\left(", "1e999999", "nan", "[1,2", "\\begin{matrix}"]) + "}"
    if kind == 9:
        return "".join(rng.choice("{}\\$^_()<>/abcxyz0123456789 boxed") for _ in range(rng.randint(0, 300)))
    if kind == 10:
        return "x" * rng.randint(40_000, 80_000) + "\\boxed{1}"
    return "<think>ok</think>\\boxed{" + str(rng.randint(0, 10)) + "/" + str(rng.randint(1, 10)) + "}"


def test_random_and_adversarial_strings_do_not_crash_or_hang():
    rng = random.Random(1234)
    golds = ["1", "0.5", "\\frac{1}{2}", "red", "B", "10", "x^2", "\\sqrt{2}"]
    start = time.monotonic()
    seen = set()
    for i in range(10_000):
        r = papo_reward(_adversarial(rng), golds[i % len(golds)])
        assert r.accuracy in (0.0, 1.0) and r.format in (0.0, 1.0)
        assert r.reward == pytest.approx(0.9 * r.accuracy + 0.1 * r.format)
        seen.add((r.accuracy, r.format))
    elapsed = time.monotonic() - start
    assert elapsed < 60, f"10,000 gradings took {elapsed:.1f}s"
    assert len(seen) >= 3  # the mix exercises right, wrong and both format outcomes


def _huge(i: int) -> str:
    """Answers that name astronomically large (or tiny) numbers: math-verify computes them exactly."""
    n = 10_000_000 + i
    return ["10^{%d}" % n, "10^%d" % n, "10^{-%d}" % n, "{10^{10}}^{10^{%d}}" % (i + 1), "9999999999^{%d}" % n,
            "\\binom{%d}{500000}" % n, "\\Gamma(%d)" % n, "(10^{%d})!" % (6 + i), "\\sin(10^{%d})" % n,
            "10^{%d}\\pi" % n, "((10^{99})^{999})^{%d}" % (999 - i), "2^{2^{2^{%d}}}" % i, "10^10^%d" % (10 + i),
            "\\exp\\left(\\exp(%d)\\right)" % (50 + i), "10^\\frac{%d}{1}" % n, "10^{1000\\cdot %d}" % (1000 + i),
            "10^{9}^{%d}" % (9 + i)][i % 17]


def test_huge_number_answers_are_screened_fast():
    """A correctness bound on the screen (not a benchmark): each of these ran math-verify to its 5 s timeout."""
    start = time.monotonic()
    for i in range(50):
        answer = _huge(i)
        r = papo_reward(f"<think>big</think> \\boxed{{{answer}}}", ["1", "3", "10"][i % 3])
        assert r == RewardResult(0.1, 0.0, 1.0), answer
        assert time.monotonic() - start < 1.0, f"answer {i} ({answer}) brought the batch to {time.monotonic() - start:.1f}s"


def test_math_grading_is_cached(monkeypatch):
    from megatron_papo.data import rewards

    calls = []
    rewards._math_equal_cached.cache_clear()
    monkeypatch.setattr(rewards, "_math_equal_unbounded", lambda p, g, t: calls.append((p, g)) or True)
    monkeypatch.setattr(rewards._GRADER, "equal", lambda p, g, t: calls.append((p, g)) or True)
    for _ in range(3):  # main thread, then off it: the same pair is graded once in all
        assert grade_answer("\\frac{71}{73}", "0.97260273972")
    worker = threading.Thread(target=lambda: grade_answer("\\frac{71}{73}", "0.97260273972"))
    worker.start()
    worker.join()
    assert calls == [("\\frac{71}{73}", "0.97260273972")]
    assert grade_answer("\\frac{71}{74}", "0.97260273972") and len(calls) == 2  # another pair is graded anew
    info = rewards._math_equal_cached.cache_info()
    assert info.maxsize is not None and info.maxsize <= 1 << 16  # bounded
    rewards._math_equal_cached.cache_clear()  # the fake's answers must not outlive this test


def test_eval_result_avg_pass_and_per_problem():
    from megatron_papo.data.rewards import EvalResult

    rows = [{"sample_id": 7, "accuracy": 1.0, "format": 1.0}, {"sample_id": 3, "accuracy": 0.0, "format": 1.0},
            {"sample_id": 7, "accuracy": 0.0, "format": 0.0}, {"sample_id": 3, "accuracy": 0.0, "format": 1.0},
            {"sample_id": 5, "accuracy": 1.0, "format": 1.0}, {"sample_id": 5, "accuracy": 1.0, "format": 1.0}]
    r = EvalResult(k=2, problems=3, rows=rows)
    assert r.per_problem == [0.5, 0.0, 1.0]  # in the order the problems first appear
    assert r.avg == 0.5 and r.pass_at_k == 2 / 3 and r.format == 5 / 6
