"""Rule-based rewards: PAPO's 0.9 * accuracy + 0.1 * format, and a plain exact match.

accuracy: the answer in the LAST `\\boxed{}` (nested braces handled) graded against the ground truth:
  a normalised string fast path (plain strings, colours, multiple-choice letters / option texts),
  then math-verify (fractions, decimals, LaTeX) for short answers that cannot name a huge number
  (`_unsafe_for_math` says exactly which). Before both, `°` is read as `^\\circ`, a bare `pi` as
  `\\pi` and `1e3` as `1000` (the tests say why). Math results are cached by (answer, truth). Never eval.
format: the reference regex `<think>.*</think>.*\\boxed\\{.*\\}.*` (full match, DOTALL), checked in
  linear time. Like the reference, whitespace around `<`, `>` and `/` is removed first.

Every grading call is bounded in time: inputs are capped in length; in the main thread
math-verify's own signal timeouts apply; in any other thread (where signals cannot work) the
math check runs in a helper process that is killed when it overruns.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import re
import threading
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Callable

MAX_RESPONSE_CHARS = 32_768  # longer responses are graded on their last MAX_RESPONSE_CHARS characters
MAX_MATH_CHARS = 256         # longer answers are compared as normalised strings only
MAX_DIGIT_RUN = 40           # an answer with a longer number is compared as a string only
MAX_BRACE_DEPTH = 6          # an answer nested deeper is compared as a string only
MAX_EXPONENT_DIGITS = 3      # all exponents of an answer together hold at most this many digits (see _unsafe_for_math)
MATH_CACHE_SIZE = 1 << 14    # (answer, truth) pairs whose math result is kept: <= 256 chars each, so a few MB
MATH_TIMEOUT_S = 5           # per math-verify parse / verify call, wall clock (int s, as math-verify takes; its default)
ACCURACY_WEIGHT = 0.9        # PAPO_SPEC: reward = 0.9 * accuracy + 0.1 * format
FORMAT_WEIGHT = 0.1


@dataclass(frozen=True)
class RewardResult:
    reward: float    # what the advantage sees
    accuracy: float  # 1.0 if the final answer is right
    format: float    # 1.0 if the response has the <think>..</think> .. \boxed{} layout


# ---------------------------------------------------------------- extraction and format

_BOXED = "\\boxed{"
# The reference's Qwen2.5-VL-32B spacing fix, re.sub(r"\s*(<|>|/)\s*", r"\1", s), written to touch
# only whitespace runs next to <, > or / (same result, no rewrite of every tag character).
_TAG_SPACE = re.compile(r"\s+(?=[<>/])|(?<=[<>/])\s+")


def clean_response(response: str) -> str:
    return _TAG_SPACE.sub("", response[-MAX_RESPONSE_CHARS:])


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced; None when absent or never closed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    for i in range(start + len(_BOXED) - 1, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(_BOXED): i]
    return None


def format_ok(response: str) -> bool:
    """re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", response, re.DOTALL), in linear time.

    A full match exists iff the text starts with <think> and has, in order after it, a </think>,
    a \\boxed{ and a }; taking the earliest occurrence of each leaves the most room for the next.
    """
    if not response.startswith("<think>"):
        return False
    end_think = response.find("</think>", len("<think>"))
    if end_think < 0:
        return False
    boxed = response.find(_BOXED, end_think + len("</think>"))
    return boxed >= 0 and response.find("}", boxed + len(_BOXED)) >= 0


# ---------------------------------------------------------------- string normalisation

_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\{([^{}]*)\}")
_CHOICE = re.compile(r"^\(?([a-h])\)?(?:[.:)]\s*(.*))?$")
_WORD = re.compile(r"^[a-z][a-z '\-]*$")


def normalize(s: str) -> str:
    """Lower-case, unwrap \\text{..}/$..$, drop spaces and a trailing full stop: 'Red.' == '\\text{red}'."""
    s = _WRAPPERS.sub(r"\1", s.strip())
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    s = " ".join(s.lower().split()).rstrip(".").strip()
    return s


def choice_letter(s: str) -> str | None:
    """'A', '(a)', 'A.', 'A) 12', 'B: red' -> the option letter; None for anything else."""
    m = _CHOICE.match(normalize(s))
    return m.group(1) if m else None


def parse_choices(problem: str) -> dict[str, str] | None:
    """Options written one per line as 'A. text', '(B) text' or 'C: text' -> {'a': text, ...}."""
    found = {}
    for line in problem.splitlines():
        m = re.match(r"^\s*\(?([A-H])[.:)]\)?\s+(.+?)\s*$", line)
        if m:
            found[m.group(1).lower()] = m.group(2)
    return found if len(found) >= 2 else None


# ---------------------------------------------------------------- math equivalence, time-bounded

def _brace_depth(s: str) -> int:
    depth = deepest = 0
    for c in s:
        if c == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif c == "}":
            depth -= 1
    return deepest


_FACTORIAL = re.compile(r"!|\\(?:[dt]?binom|choose|Gamma)(?![a-zA-Z])")
_GROWTH = re.compile(r"\^|\*\*|\\exp(?![a-zA-Z])")  # what raises its operand to a power
_ATOM = re.compile(r"[-+]?[\d.,]+|\\[a-zA-Z]+|.", re.DOTALL)  # a number, a \command or one character
_CLOSE = {"{": "}", "(": ")", "[": "]"}


def _operand(s: str, i: int) -> int:
    """End of the operand starting at s[i] (after spaces): a balanced group, a number, or a \\command
    with the groups that follow it (`\\frac{a}{b}`), or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i == len(s):
        return i
    if s[i] in _CLOSE:
        opening, depth = s[i], 0
        for j in range(i, len(s)):
            depth += (s[j] == opening) - (s[j] == _CLOSE[opening])
            if depth == 0:
                return j + 1
        return len(s)
    end = _ATOM.match(s, i).end()
    while s[i] == "\\" and end < len(s) and s[end] == "{":
        end = _operand(s, end)
    return end


def _unsafe_for_math(s: str) -> bool:
    """Answers math-verify could spend long on; they are compared as normalised strings only.

    math-verify computes numbers exactly, so `10^{10000000}` runs it to its timeout. The rule: an
    answer is unsafe when it is long or deeply nested, has a number of more than MAX_DIGIT_RUN
    digits, a factorial in any spelling (`!`, `\\binom`, `\\choose`, `\\Gamma`: `\\binom{x}{999}` alone
    takes seconds; the reference grader rejects `5!` for 120 anyway), or when its exponents (what
    follows each ^, ** or \\exp) together hold more than MAX_EXPONENT_DIGITS digits, or one of them
    holds another power or is followed straight by one (`2^{2^{9}}`, `10^9^9`, `\\exp(\\exp(9))`):
    towers. Together these bound every number an answer can name by about (10^40)^999, which
    math-verify handles in well under a second. Slow symbolic work (`(a+b+c+d+e)^{12}`,
    `\\exp(999)\\sin(2)` against 3) is not screened: math-verify's timeout bounds it, and the cache
    makes each pair cost that once.
    """
    if (len(s) > MAX_MATH_CHARS or _FACTORIAL.search(s) or _brace_depth(s) > MAX_BRACE_DEPTH
            or re.search(r"\d{%d}" % (MAX_DIGIT_RUN + 1), s) is not None):
        return True
    s = s.replace("\\left", "").replace("\\right", "")  # \exp\left(..\right) is \exp(..)
    digits = 0
    for m in _GROWTH.finditer(s):
        end = _operand(s, m.end())
        exponent = s[m.end():end]
        if _GROWTH.search(exponent) or s[end:].lstrip(" ").startswith(("^", "**")):
            return True
        digits += sum(c.isdigit() for c in exponent)
    return digits > MAX_EXPONENT_DIGITS


@functools.lru_cache(maxsize=4096)  # n rollouts share a ground truth and often an answer
def _parse(expr: str, timeout_s: int | None):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return tuple(parse(_BOXED + expr + "}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                       parsing_timeout=timeout_s))


def _math_equal_unbounded(pred: str, gold: str, timeout_s: int | None) -> bool:
    from math_verify import verify

    try:
        g, p = _parse(gold, timeout_s), _parse(pred, timeout_s)
        return bool(g and p and verify(list(g), list(p), timeout_seconds=timeout_s))
    except Exception:  # math-verify raises on pathological input; a failure to parse is a wrong answer
        return False


def _grader_loop(conn) -> None:
    """Helper-process main loop: its own main thread, so math-verify's signal timeouts work here too."""
    while True:
        try:
            pred, gold = conn.recv()
        except EOFError:
            return
        conn.send(_math_equal_unbounded(pred, gold, MATH_TIMEOUT_S))


class _GraderProcess:
    """One lazily spawned helper process for math checks made off the main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = self._conn = None
        self._warm = False  # has the current process answered once (its imports are done)?

    def equal(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                ctx = mp.get_context("spawn")  # not fork: the trainer process has threads
                self._conn, child = ctx.Pipe()
                self._proc = ctx.Process(target=_grader_loop, args=(child,), daemon=True)
                self._proc.start()
                child.close()
            try:
                self._conn.send((pred, gold))
                # the first call also waits for the spawn (imports); later calls for one check
                if self._conn.poll(timeout_s if self._warm else timeout_s + 30):
                    result, self._warm = self._conn.recv(), True
                    return result
            except (EOFError, OSError):  # the helper died: treat like an overrun
                pass
            self._proc.kill()  # overran: drop the process, the next call starts a fresh one
            self._proc.join()
            self._proc, self._warm = None, False
            return False


_GRADER = _GraderProcess()


def math_equal(pred: str, gold: str) -> bool:
    """math-verify equivalence with a hard time bound, in any thread."""
    if _unsafe_for_math(pred) or _unsafe_for_math(gold):
        return False
    return _math_equal_cached(pred, gold)


# The n rollouts of a prompt share its truth and often an answer, and a slow pair would otherwise
# cost its timeout every time it recurs. An overrun is cached as wrong like any result: it is a
# property of the pair. Only screened pairs (<= MAX_MATH_CHARS each) get here, so entries are small.
@functools.lru_cache(maxsize=MATH_CACHE_SIZE)
def _math_equal_cached(pred: str, gold: str) -> bool:
    if threading.current_thread() is threading.main_thread():
        return _math_equal_unbounded(pred, gold, MATH_TIMEOUT_S)
    return _GRADER.equal(pred, gold, 4 * MATH_TIMEOUT_S)


# ---------------------------------------------------------------- grading

_BARE_PI = re.compile(r"(?<![A-Za-z\\])pi(?![A-Za-z])")  # "pi", "2pi", "pi/2"; not "spin", "\\pi", "\\varpi"
_SCIENTIFIC = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+")  # one way to split digits: linear


def canonical(s: str) -> str:
    """Spellings neither grader reads as meant, rewritten: `°` -> `^\\circ`, a bare `pi` -> `\\pi`,
    a whole answer in scientific notation (`1e3`, `1.5e-3`) -> its decimal (`1000`, `0.0015`).
    Scientific notation with an exponent of more than MAX_DIGIT_RUN is left alone (a string then)."""
    s = _BARE_PI.sub(r"\\pi", s.strip().replace("°", "^\\circ"))
    if _SCIENTIFIC.fullmatch(s) and abs(Decimal(s).as_tuple().exponent) <= MAX_DIGIT_RUN:
        s = format(Decimal(s), "f")
    return s


def grade_answer(pred: str | None, gold: str, choices: dict[str, str] | None = None) -> bool:
    """Is the extracted answer `pred` the ground truth `gold`? (choices: letter -> option text)."""
    if pred is None:
        return False
    pred, gold = pred[:MAX_RESPONSE_CHARS], str(gold)
    if _BOXED in gold:  # some datasets store the ground truth boxed
        gold = last_boxed(gold) or gold
    pred, gold = canonical(pred), canonical(gold)
    if choices:
        choices = {k: canonical(v) for k, v in choices.items()}
    p, g = normalize(pred), normalize(gold)
    if not p:
        return False
    if p == g:
        return True
    pl, gl = choice_letter(pred), choice_letter(gold)
    if gl is not None and len(g) <= 3:  # the ground truth is an option letter: 'A', '(A)', 'A.'
        if pl == gl:
            return True
        return bool(choices) and normalize(choices.get(gl, "\0")) == p
    if choices and pl is not None and normalize(choices.get(pl, "\0")) == g:
        return True  # the model answered the letter of the option whose text is the ground truth
    if _WORD.match(g) or _WORD.match(p):
        return False  # plain words (colours, shape names) match as strings only: 'red' is not E*d*r
    return math_equal(pred, gold)


def papo_reward(response: str, ground_truth: str, choices: dict[str, str] | None = None) -> RewardResult:
    response = clean_response(response)
    accuracy = float(grade_answer(last_boxed(response), ground_truth, choices))
    fmt = float(format_ok(response))
    return RewardResult(ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * fmt, accuracy, fmt)


def exact_match_reward(response: str, ground_truth: str, choices: dict[str, str] | None = None) -> RewardResult:
    """reward = accuracy = normalised string equality of the last \\boxed{} answer (format only logged)."""
    response = clean_response(response)
    pred = last_boxed(response)
    accuracy = float(pred is not None and normalize(pred) == normalize(str(ground_truth)))
    return RewardResult(accuracy, accuracy, float(format_ok(response)))


RewardFn = Callable[..., RewardResult]
REWARD_FNS: dict[str, RewardFn] = {"papo": papo_reward, "exact_match": exact_match_reward}


def get_reward_fn(name: str) -> RewardFn:
    if name not in REWARD_FNS:
        raise ValueError(f"unknown reward function {name!r}; valid: {sorted(REWARD_FNS)}")
    return REWARD_FNS[name]


@dataclass
class EvalResult:
    """k graded responses per problem (megatron_papo.eval, the trainer's validation): avg@k, pass@k."""
    k: int
    problems: int
    rows: list[dict] = field(default_factory=list)  # one per response: sample_id, accuracy, format (+ answer, response)

    @property
    def avg(self) -> float:
        """avg@k: mean accuracy over every response."""
        return sum(r["accuracy"] for r in self.rows) / max(len(self.rows), 1)

    @property
    def pass_at_k(self) -> float:
        """pass@k: fraction of problems with at least one right response among their k."""
        return len({r["sample_id"] for r in self.rows if r["accuracy"] > 0}) / max(self.problems, 1)

    @property
    def format(self) -> float:
        return sum(r["format"] for r in self.rows) / max(len(self.rows), 1)

    @property
    def per_problem(self) -> list[float]:
        """Mean accuracy of each problem's responses, problems in the order first met."""
        by_problem: dict = {}
        for r in self.rows:
            by_problem.setdefault(r["sample_id"], []).append(r["accuracy"])
        return [sum(a) / len(a) for a in by_problem.values()]
