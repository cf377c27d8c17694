"""Judges that score one generated answer: the reference ones and `load_judge` for `eval.judge`.

The interface, so that any judge (the team's "Tribunal" included) plugs in by `_target_` alone:

    judge(prompt: str, answer: str, expected: str | list[str] | None, record: dict) -> (score, reason)

- `prompt` is the user turn the model answered and `answer` its greedy reply.
- `expected` is the prompt file's `expected` field: a string, a list of acceptable strings, or None.
- `record` is the whole prompt-file line as a dict (`tags` and any extra fields a judge wants).
- It returns `(score, reason)`: `score` a float, higher is better (the reference judges give 0 or 1,
  `ModelJudge` 0..1), or None when it cannot score the record; `reason` one short string.

`eval.judge._target_` names either such a function or a class whose instances are such callables.
The other keys of `eval.judge` are keyword arguments: passed to the function on every call, or to
the class once (a judge that loads a model loads it once). Keys starting with `_` are Hydra's.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from noesis_accel.core.errors import ConfigError

Verdict = tuple[float | None, str]
Judge = Callable[[str, str, Any, dict], Any]

# ---------------------------------------------------------------- reference judges (text matching)


def _alternatives(expected: Any) -> list[str]:
    if expected is None:
        return []
    if isinstance(expected, str):
        return [expected]
    return [str(item) for item in expected]


def _normalise(text: str, case_sensitive: bool) -> str:
    """Whitespace collapsed and end punctuation dropped: "Noesis." and " noesis" are the same answer."""
    text = " ".join(str(text).split()).rstrip(".!?;: ").strip()
    return text if case_sensitive else text.casefold()


def _any_option(expected: Any, matches: Callable[[str], bool], hit: str, miss: str) -> Verdict:
    """1 with `hit` naming the first expected answer that `matches`, 0 with `miss` listing them all, None if none."""
    options = _alternatives(expected)
    if not options:
        return None, "no expected answer"
    for option in options:
        if matches(option):
            return 1.0, f"{hit} {option!r}"
    return 0.0, f"{miss} {' / '.join(repr(o) for o in options)}"


def exact(prompt: str, answer: str, expected: Any, record: dict, *, case_sensitive: bool = False) -> Verdict:
    """1 if the answer is one of the expected answers (ignoring case, spacing, end punctuation), else 0."""
    got = _normalise(answer, case_sensitive)
    return _any_option(expected, lambda option: got == _normalise(option, case_sensitive), "equals", "is not")


def contains(prompt: str, answer: str, expected: Any, record: dict, *, case_sensitive: bool = False) -> Verdict:
    """1 if any expected answer occurs in the answer (ignoring case and spacing), else 0."""
    got = _normalise(answer, case_sensitive)
    return _any_option(expected, lambda option: _normalise(option, case_sensitive) in got, "contains", "lacks")


def regex(prompt: str, answer: str, expected: Any, record: dict, *, ignore_case: bool = True) -> Verdict:
    """1 if any expected answer, read as a Python regular expression, is found in the answer, else 0."""
    patterns = _alternatives(expected)
    if not patterns:
        return None, "no expected answer"
    flags = re.IGNORECASE if ignore_case else 0
    for pattern in patterns:
        try:
            if re.search(pattern, answer, flags):
                return 1.0, f"matches /{pattern}/"
        except re.error as err:
            return None, f"bad pattern /{pattern}/: {err}"
    return 0.0, f"matches none of {' / '.join(f'/{p}/' for p in patterns)}"


# ---------------------------------------------------------------- model-as-judge

DEFAULT_RUBRIC = (
    "You are grading the answer of an AI assistant.\n\n"
    "Question: {prompt}\n"
    "Expected answer: {expected}\n"
    "Assistant's answer: {answer}\n\n"
    "Does the assistant's answer agree with the expected answer? Score it from {low} (wrong) to {high} "
    "(fully correct). Reply with one line: Score: N - a short reason."
)

_NUMBER = r"(\d+(?:\.\d+)?)"


def parse_score(text: str, low: float = 1, high: float = 5) -> float | None:
    """A judge model's score as a fraction in [0, 1], or None if its reply holds no usable score.

    Accepted, most explicit first: a JSON object with "score"; "Score: 4", "**score** = 4/5",
    "score of 8 out of 10"; "4/5" or "4 out of 5" anywhere; a bare number opening the reply.
    A number over a denominator other than `high` is read as that fraction ("8/10" is 0.8).
    """
    span = high - low
    if span <= 0:
        raise ValueError(f"high ({high}) must be above low ({low})")

    def on_scale(value: float, denominator: float | None) -> float | None:
        if denominator is not None and denominator != high:
            return min(1.0, max(0.0, value / denominator)) if denominator > 0 and 0 <= value <= denominator else None
        return (value - low) / span if low <= value <= high else None

    for blob in re.findall(r"\{[^{}]*\}", text):
        try:
            found = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(found, dict) and isinstance(found.get("score"), (int, float)):
            return on_scale(float(found["score"]), None)
    ratio = rf"{_NUMBER}(?:\s*(?:/|out of)\s*{_NUMBER})?"
    match = re.search(rf"score[^0-9\n]{{0,16}}?{ratio}", text, re.IGNORECASE)
    if match is None:
        match = re.search(rf"{_NUMBER}\s*(?:/|out of)\s*{_NUMBER}", text, re.IGNORECASE)
    if match is None:
        match = re.match(rf"\W*{_NUMBER}(?!\.?\d)", text)
    if match is None:
        return None
    denominator = match.group(2) if match.re.groups >= 2 else None
    return on_scale(float(match.group(1)), float(denominator) if denominator else None)


class ModelJudge:
    """Model-as-judge: asks a chat model to grade each answer against a rubric and parses its score.

    Any causal LM with a chat template works: a local directory, a hub id, or a directory holding
    a GGUF file (`gguf_file`). The model is loaded once, when the judge is built.
    """

    def __init__(
        self,
        name_or_path: str,
        gguf_file: str | None = None,
        rubric: str | None = None,
        low: float = 1,
        high: float = 5,
        max_new_tokens: int = 64,
        device: str = "auto",
        dtype: str = "float32",
    ) -> None:
        import torch

        from noesis_accel.config import ModelConfig
        from noesis_accel.training import modeling

        self.rubric = rubric or DEFAULT_RUBRIC
        try:
            self.rubric.format(prompt="", answer="", expected="", low=low, high=high)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"eval.judge.rubric: cannot fill it in ({err.__class__.__name__}: {err}); it may use "
                "{prompt}, {answer}, {expected}, {low} and {high}; write other braces as {{ and }}"
            ) from None
        if high <= low:
            raise ConfigError(f"eval.judge: high ({high}) must be above low ({low})")
        self.low, self.high, self.max_new_tokens = low, high, int(max_new_tokens)
        model_cfg = OmegaConf.structured(ModelConfig(name_or_path=str(name_or_path), gguf_file=gguf_file, dtype=dtype))
        on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.tokenizer = modeling.load_tokenizer(model_cfg)
        self.model = modeling.load_base_model(model_cfg, len(self.tokenizer), device_is_cuda=on_cuda)
        self.model.to("cuda" if on_cuda else "cpu")
        self.model.config.use_cache = True

    def question(self, prompt: str, answer: str, expected: Any) -> str:
        options = _alternatives(expected)
        shown = " / ".join(options) if options else "(none given: judge whether the answer is correct and helpful)"
        return self.rubric.format(prompt=prompt, answer=answer, expected=shown, low=self.low, high=self.high)

    def __call__(self, prompt: str, answer: str, expected: Any, record: dict) -> Verdict:
        from noesis_accel.training.generate import reply

        verdict = reply(self.model, self.tokenizer, self.question(prompt, answer, expected), self.max_new_tokens)
        score = parse_score(verdict, self.low, self.high)
        first_line = verdict.strip().splitlines()[0] if verdict.strip() else ""
        if score is None:
            return None, f"no score in the judge's reply: {first_line[:100]!r}"
        return score, first_line[:200]


# ---------------------------------------------------------------- loading a judge from config


def import_target(target: str, key: str) -> Any:
    """The object `target` ("package.module.name") names, or a one-line error naming `key`."""
    parts = [part for part in str(target).split(".") if part]
    hint = (
        "give module.function or module.Class on the Python path, e.g. noesis_accel.after.judges.contains "
        "(pip install your judge's package or add its folder to PYTHONPATH)"
    )
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise ConfigError(f"{key}: importing {module_name} for '{target}' failed: {err}") from None
        except Exception as err:  # the judge's own module raised while importing
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(
                f"{key}: importing {module_name} for '{target}' failed ({err.__class__.__name__}: {first})"
            ) from None
        found: Any = module
        for attr in parts[cut:]:
            if not hasattr(found, attr):
                raise ConfigError(f"{key}: cannot import '{target}': {module_name} has no '{attr}'; {hint}")
            found = getattr(found, attr)
        return found
    raise ConfigError(f"{key}: cannot import '{target}' (no module '{parts[0] if parts else target}' found); {hint}")


def load_judge(judge_cfg: Any, key: str = "eval.judge") -> tuple[Callable[[str, str, Any, dict], Verdict], str]:
    """Build the judge `judge_cfg` describes and check it takes (prompt, answer, expected, record).

    Returns the callable and its `_target_` (the judge's name in results).
    """
    # Whatever was written under `key`: a mapping, a bare target, or something the checks below refuse.
    spec: Any = OmegaConf.to_container(judge_cfg, resolve=True) if OmegaConf.is_config(judge_cfg) else judge_cfg
    if isinstance(spec, str):
        spec = {"_target_": spec}
    if not isinstance(spec, dict) or not spec.get("_target_"):
        raise ConfigError(
            f"{key}: needs a _target_ naming a judge, e.g. {key}._target_=noesis_accel.after.judges.contains "
            "(or judge=contains|exact|regex|model)"
        )
    target = str(spec["_target_"])
    options = {k: v for k, v in spec.items() if not str(k).startswith("_")}
    found = import_target(target, f"{key}._target_")
    if inspect.isclass(found):
        try:
            judge = found(**options)
        except TypeError as err:
            raise ConfigError(f"{key}: building {target} failed ({err}); check the keys under {key}") from None
        if not callable(judge):
            raise ConfigError(
                f"{key}: instances of {target} are not callable; give the class a "
                "__call__(prompt, answer, expected, record)"
            )
    elif callable(found):
        judge = functools.partial(found, **options) if options else found
    else:
        raise ConfigError(f"{key}._target_: '{target}' is a {type(found).__name__}, not a function or class")
    _check_call(
        found if not inspect.isclass(found) else judge, options if not inspect.isclass(found) else {}, target, key
    )
    return judge, target


def _check_call(function: Any, options: dict[str, Any], target: str, key: str) -> None:
    """The judge takes (prompt, answer, expected, record) and every option under `key`, or a one-line error."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin without a signature: trust it
    try:
        signature.bind("prompt", "answer", None, {}, **options)
    except TypeError as err:
        given = f" and the options {', '.join(sorted(options))} under {key}" if options else ""
        raise ConfigError(f"{key}: {target} must accept (prompt, answer, expected, record){given} ({err})") from None


def as_verdict(result: Any, target: str) -> Verdict:
    """A judge's return value as (score or None, reason); a one-line error if it is neither."""
    score, reason = None, ""
    if isinstance(result, dict):
        score, reason = result.get("score"), result.get("reason", "")
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        score, reason = result
    elif hasattr(result, "score"):
        score, reason = result.score, getattr(result, "reason", "")
    else:
        raise ConfigError(f"eval.judge: {target} returned {type(result).__name__}; a judge returns (score, reason)")
    if score is not None:
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise ConfigError(
                f"eval.judge: {target} returned the score {score!r}; a score is a number or None"
            ) from None
    return score, str(reason)
