"""The checks an export passes before it is called done, and `verify.json`, where they are kept.

- merged safetensors against base + adapter: the logits of a few prompts, reloaded from the written
  folder by plain transformers, within the dtype's tolerance;
- each GGUF against the merged model, in llama.cpp: it loads; its tokenizer gives our token ids for every
  prompt rendered with the chat template training used; its greedy answers equal the merged model's
  for the first 32 tokens (required where the file keeps the weights as exactly as f16; reported, with
  the agreement, for quantised files); and its generation ends at the template's end-of-turn token.

A failed check leaves the export in place, marked failed in verify.json, and the command exits
non-zero with one line naming the check and by how much it failed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from noesis_accel.config import Config
from noesis_accel.core.errors import UserError

VERIFY_FILE = "verify.json"
LOGIT_PROMPTS = 4  # prompts whose logits compare the merged weights with base + adapter
ANSWER_TOKENS = 32  # greedy tokens that must agree between the GGUF and the merged model
STOP_BUDGET = 64  # tokens an answer may take to reach its end-of-turn token
# Largest |logit difference| / largest |logit| between base + adapter and the merged weights. Merging
# changes only the order of the sums (W x + s B A x against (W + s B A) x) and the rounding of W + s B A
# to the dtype: about 1e-6 in float32; one rounding of every weight in 16 bits.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
# GGUF types whose answers must equal the merged model's: they keep the weights at least as exactly as f16.
EXACT_TYPES = ("f32", "f16")  # (bf16 rounds a float32 model's weights to 8 bits of mantissa)


class ExportCheckFailed(UserError):
    exit_code = 1  # the command worked; its product did not pass


@dataclass
class Check:
    """One check's outcome; `passed` None: not applicable (the reason in `detail`)."""

    name: str
    file: str
    passed: bool | None
    detail: str
    required: bool = True
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reference:
    """What the merged model does on the check prompts: the GGUF files are compared with this."""

    prompts: list[str]  # the user turns
    rendered: list[str]  # each rendered with the training chat template and a generation prompt
    ids: list[list[int]]  # our tokenizer's ids for each rendering
    answers: list[list[int]]  # greedy continuation, up to STOP_BUDGET tokens or the end of turn
    end_of_turn: int | None  # the token the template closes an assistant turn with
    end_of_turn_text: str | None  # that token as our tokenizer spells it ("<|im_end|>")
    stop_ids: tuple[int, ...]  # ids the merged model's generation stops at
    add_special: bool  # whether the renderings were encoded with BOS/EOS added (no template: plain text)


# ---------------------------------------------------------------- prompts


def render(tokenizer: Any, prompt: str) -> str:
    """A user turn as a server renders it for generation; the bare text where there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def adds_special_tokens(tokenizer: Any) -> bool:
    """Whether a rendering is encoded with the tokenizer's BOS/EOS: not when a chat template wrote them."""
    return not getattr(tokenizer, "chat_template", None)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Our ids for a rendering: the template writes any BOS itself; plain text gets what encode adds."""
    return list(tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer)).input_ids)


def end_of_turn_token(tokenizer: Any) -> int | None:
    """The first token the chat template writes after an assistant's words (ChatML's <|im_end|>)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token_id
    words = "Noesis-end-of-turn-probe"
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": words}]
    text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    after = text[text.index(words) + len(words) :] if words in text else ""
    ids = tokenizer(after, add_special_tokens=False).input_ids if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    # A template may put text before the token (Llama 2 writes ' ' + eos): the first special one closes the turn.
    closing = next((i for i in ids if i in special), ids[0] if ids else None)
    return int(closing) if closing is not None else tokenizer.eos_token_id


VERIFY_PROMPTS = 16  # the run's eval prompts asked in the checks, at most


def check_prompts(cfg: Config, heldout: bool = True) -> tuple[list[str], str]:
    """The user turns the checks ask: the run's eval prompts, as `noesis eval` would pick them.

    Without `heldout` the run's held-out records are not read (that tokenises the data set): the logits
    check of a plain export holds for any text, so the prompt file serves.
    """
    from noesis_accel.after.prompts import DEMO_PROMPTS, asks_heldout, from_file, from_heldout

    if heldout and asks_heldout(cfg.eval.prompts, cfg.data.path):
        from noesis_accel.after.evaluate import _heldout_set, _locations
        from noesis_accel.training.modeling import load_tokenizer

        held_out = _heldout_set(cfg, load_tokenizer(cfg.model))
        asked = from_heldout(cfg.data, _locations(held_out, VERIFY_PROMPTS))
        if asked.records:
            return [r.prompt for r in asked.records], asked.source
    asked = from_file(cfg.eval.prompts or str(DEMO_PROMPTS))
    records = asked.records[:VERIFY_PROMPTS]
    return [r.prompt for r in records], f"{len(records)} from {asked.file}"


def use_training_template(tokenizer: Any, cfg: Config) -> None:
    """Give the tokenizer the chat template training rendered with (`data.chat_template`), so the export
    ships it and every check renders with it; a run without any template keeps none."""
    from noesis_accel.training.templates import resolve

    spec = cfg.data.chat_template
    if spec is None and not getattr(tokenizer, "chat_template", None):
        return
    tokenizer.chat_template = resolve(tokenizer, spec)


def rendered_prompts(tokenizer: Any, prompts: list[str]) -> tuple[list[str], list[list[int]]]:
    rendered = [render(tokenizer, prompt) for prompt in prompts]
    return rendered, [encode(tokenizer, text) for text in rendered]


def reference_answers(model: Any, tokenizer: Any, prompts: list[str], rendered: list[str], ids: list) -> Reference:
    """What the merged model (as written, reloaded) answers: the standard the GGUF files are held to."""
    end = end_of_turn_token(tokenizer)
    eos = model.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []), *([end] if end is not None else [])}
    answers = greedy_answers(model, ids, tuple(sorted(stops)), tokenizer.pad_token_id)
    text = None if end is None else str(tokenizer.convert_ids_to_tokens(end))
    return Reference(prompts, rendered, ids, answers, end, text, tuple(sorted(stops)), adds_special_tokens(tokenizer))


# ---------------------------------------------------------------- merged against base + adapter


def prompt_logits(model: Any, token_ids: list[list[int]]) -> list[Any]:
    """The float32 logits of each prompt, one forward pass each (no padding to differ on)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in token_ids]


def merged_check(reference: list[Any], merged: list[Any], dtype: str) -> Check:
    """The merged model's logits against base + adapter's, relative to the largest logit."""
    worst = max(float((a - b).abs().max()) for a, b in zip(reference, merged))
    scale = max(float(a.abs().max()) for a in reference) or 1.0
    tolerance = RELATIVE_TOLERANCE.get(dtype, 5e-2)
    passed = worst <= tolerance * scale
    detail = (
        f"max |logit difference| {worst:.3g} over {len(reference)} prompts, "
        f"{'within' if passed else 'above'} the {dtype} tolerance {tolerance * scale:.3g} "
        f"({tolerance:g} x largest |logit| {scale:.3g})"
    )
    figures = {"max_abs_diff": worst, "tolerance": tolerance * scale, "prompts": len(reference), "dtype": dtype}
    return Check("merged vs base + adapter", "safetensors", passed, detail, figures=figures)


def greedy_answers(model: Any, token_ids: list[list[int]], stop_ids: tuple[int, ...], pad_id: int | None) -> list:
    """Greedy continuations by plain transformers, each up to STOP_BUDGET tokens, its stop token kept."""
    import torch

    device = next(model.parameters()).device
    answers = []
    with torch.no_grad():
        for ids in token_ids:
            output = model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=STOP_BUDGET,
                do_sample=False,
                eos_token_id=list(stop_ids) or None,
                pad_token_id=pad_id,
            )
            answers.append([int(t) for t in output[0, len(ids) :]])
    return answers


# ---------------------------------------------------------------- a GGUF against the merged model


def gguf_checks(path: Path, quant: str, reference: Reference, exact: bool) -> list[Check]:
    """Load `path` in llama.cpp and check its tokenizer, answers and stopping against `reference`."""
    from noesis_accel.after.llamacpp import GgufModel

    name = path.name
    try:
        model = GgufModel(path, n_ctx=max(512, max((len(ids) for ids in reference.ids), default=0) + STOP_BUDGET))
    except Exception as err:  # llama.cpp refuses a file it cannot read: that is the check's result
        return [Check("gguf loads", name, False, f"llama.cpp could not load it: {err}")]
    try:
        checks = [Check("gguf loads", name, True, f"llama.cpp loaded it ({path.stat().st_size / 1e6:,.1f} MB)")]
        checks.append(_tokenizer_check(model, name, reference))
        answers = [model.greedy(ids, STOP_BUDGET) for ids in reference.ids]
        checks.append(_answers_check(name, quant, reference, answers, exact))
        checks.append(_stop_check(model, name, reference, answers, exact))
        return checks
    finally:
        model.close()


def _tokenizer_check(model: Any, name: str, reference: Reference) -> Check:
    theirs = [model.tokens(text, reference.add_special) for text in reference.rendered]
    differing = [i for i, (ours, other) in enumerate(zip(reference.ids, theirs)) if ours != other]
    count = len(reference.ids)
    if not differing:
        return Check("gguf tokenizer", name, True, f"the same token ids for all {count} rendered prompts")
    first = differing[0]
    ours, other = reference.ids[first], theirs[first]
    at = next((i for i, (a, b) in enumerate(zip(ours, other)) if a != b), min(len(ours), len(other)))
    detail = (
        f"token ids differ for {len(differing)} of {count} rendered prompts; first: prompt "
        f"{reference.prompts[first]!r} at token {at} (ours {ours[at : at + 3]}, llama.cpp {other[at : at + 3]})"
    )
    return Check("gguf tokenizer", name, False, detail, figures={"differing_prompts": len(differing)})


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _answers_check(name: str, quant: str, reference: Reference, answers: list[list[int]], exact: bool) -> Check:
    """The first ANSWER_TOKENS greedy tokens of each prompt, the GGUF's against the merged model's."""
    equal, prefixes = 0, []
    for ours, theirs in zip(reference.answers, answers):
        ours, theirs = ours[:ANSWER_TOKENS], theirs[:ANSWER_TOKENS]
        equal += ours == theirs
        prefixes.append(_common_prefix(ours, theirs) / max(1, len(ours)))
    count = len(answers)
    agreement = equal / count if count else 1.0
    figures = {
        "tokens": ANSWER_TOKENS,
        "equal_prompts": equal,
        "prompts": count,
        "agreement": round(agreement, 4),
        "mean_common_prefix": round(sum(prefixes) / count, 4) if count else 1.0,
    }
    detail = (
        f"greedy answers equal to the merged model's for {equal} of {count} prompts over {ANSWER_TOKENS} tokens "
        f"(mean common prefix {figures['mean_common_prefix']:.0%})"
    )
    if not exact:
        detail += f"; reported, not required: {quant} rounds the weights"
    return Check("gguf greedy answers", name, equal == count, detail, required=exact, figures=figures)


def _stop_check(model: Any, name: str, reference: Reference, answers: list[list[int]], exact: bool) -> Check:
    """Generation ends at the template's end-of-turn token, wherever the merged model's does."""
    end, token = reference.end_of_turn, reference.end_of_turn_text
    if end is None or not model.is_end_of_generation(end):
        detail = (
            f"the template's end-of-turn token ({token!r}) does not end generation in llama.cpp: answers never stop"
        )
        return Check("gguf stops at end of turn", name, False, detail)
    stopping = [i for i, ours in enumerate(reference.answers) if ours and ours[-1] in reference.stop_ids]
    stopped = [i for i in stopping if answers[i] and answers[i][-1] == end]
    figures = {"end_of_turn": token, "merged_stops": len(stopping), "gguf_stops": len(stopped), "budget": STOP_BUDGET}
    if not stopping:
        detail = f"{token!r} ends generation in llama.cpp; the merged model ends no answer within {STOP_BUDGET} tokens"
        return Check("gguf stops at end of turn", name, None, detail, required=exact, figures=figures)
    passed = len(stopped) == len(stopping)
    detail = (
        f"{len(stopped)} of the {len(stopping)} answers the merged model ends within {STOP_BUDGET} tokens "
        f"end at {token!r} in llama.cpp too"
    )
    return Check("gguf stops at end of turn", name, passed, detail, required=exact, figures=figures)


# ---------------------------------------------------------------- verify.json


def write_verify(export_dir: Path, checks: list[Check], prompts_source: str, log: Any = print) -> dict[str, Any]:
    """Print each check, write verify.json, and raise ExportCheckFailed naming the first required failure."""
    failed = [c for c in checks if c.required and c.passed is False]
    summary = {
        "export": str(export_dir),
        "status": "failed" if failed else "passed",
        "prompts": prompts_source,
        "checks": [asdict(c) for c in checks],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for check in checks:
        mark = {True: "ok", False: "FAILED" if check.required else "differs (reported)", None: "n/a"}[check.passed]
        log(f"  check {check.name} [{check.file}]: {mark}: {check.detail}")
    path = export_dir / VERIFY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise ExportCheckFailed(
            f"export check failed: {first.name} [{first.file}]: {first.detail}{more}; "
            f"the export is kept in {export_dir}, marked failed in {path.name}"
        )
    return summary
