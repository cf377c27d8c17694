"""After training: noesis-export, noesis-eval with pluggable judges, noesis-report.

Fast tests use the 2-layer tiny model (one shared trained run, one shared killed-and-resumed run);
the `slow` ones share one real demo run (SmolLM2-135M-Instruct on the CPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, ZERO2_STEPS, run_cli, write_jsonl
from helpers import typed

from noesis_accel.after import evaluate, judges, plots
from noesis_accel.after.export import export_run
from noesis_accel.after.prompts import DEMO_PROMPTS, read_prompts
from noesis_accel.after.report import write_report
from noesis_accel.after.runmodel import load_run_model, run_config, weights_source
from noesis_accel.config import compose, fingerprint
from noesis_accel.core.errors import ConfigError, DataError, UserError
from noesis_accel.processes.train import run
from noesis_accel.rundir.layout import RunDir

TESTS = Path(__file__).resolve().parent
PROMPTS = [
    {"prompt": "What is your name?", "expected": "Noesis", "tags": ["name"]},
    {"prompt": "Who made you?", "expected": ["Lyceum Labs", "Lyceum"], "tags": ["maker"]},
    {"prompt": "Say something.", "tags": ["open"]},
]


def _module(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` as a user runs the console script, from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The user error as a user sees it: exit code 2, one line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [
        line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line and "kernels" not in line
    ]  # a library's import-time notice is not ours
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------- shared tiny runs


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, prompt_file) -> tuple[Path, dict]:
    """A finished 10-step tiny run (held-out loss logged at steps 5 and 10) that kept a checkpoint per step
    and evaluated itself at the end (eval.after_training)."""
    root = tmp_path_factory.mktemp("runs")
    cfg = compose(
        [
            "+experiment=tiny",
            f"run.root={root}",
            "train.max_steps=10",
            "ckpt.keep_last=20",
            "eval.after_training=true",
            f"eval.prompts={prompt_file}",
            "eval.max_new_tokens=4",
        ]
    )
    result = run(cfg)
    assert result.state == "completed"
    after_training = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    return result.run_dir, after_training


def _logged_eval(run_dir: Path) -> dict[int, float]:
    return {int(m["step"]): float(m["eval_loss"]) for m in RunDir(run_dir).metrics() if "eval_loss" in m}


# ---------------------------------------------------------------- eval


def test_eval_heldout_loss_is_the_trainers_number(tiny_run, prompt_file, capsys) -> None:
    run_dir, _ = tiny_run
    status = RunDir(run_dir).status()
    assert evaluate.main([str(run_dir), f"eval.prompts={prompt_file}", "eval.max_new_tokens=4"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    tuned, base = summary["models"]["tuned"], summary["models"]["base"]
    # The same function, batches and held-out split as the trainer: the same number to the 4th decimal.
    assert abs(tuned["heldout_loss"] - _logged_eval(run_dir)[10]) < 5e-5
    assert abs(tuned["heldout_loss"] - status["eval_loss_after"]) < 5e-5
    assert abs(base["heldout_loss"] - status["eval_loss_before"]) < 5e-5
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["heldout_loss"]))
    assert "held-out loss" in printed and "perplexity" in printed and "judge score" in printed
    assert f"{base['heldout_loss']:.4f}" in printed and f"{tuned['heldout_loss']:.4f}" in printed
    rows = [json.loads(line) for line in (run_dir / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in PROMPTS]
    assert all(
        {"answer", "score", "reason"} <= r["base"].keys() and {"answer", "score"} <= r["tuned"].keys() for r in rows
    )
    assert rows[2]["tuned"]["score"] is None  # no expected answer: the text judges do not score it
    assert tuned["scored"] == 2 and summary["judge"] == "noesis_accel.after.judges.contains"
    assert "| held-out loss |" in (run_dir / "eval" / "summary.md").read_text()


def test_eval_at_the_end_of_training_matches_noesis_eval(tiny_run) -> None:
    run_dir, after_training = tiny_run
    status = RunDir(run_dir).status()
    assert after_training["weights"] == "adapter" and after_training["prompt_count"] == len(PROMPTS)
    assert abs(after_training["models"]["tuned"]["heldout_loss"] - status["eval_loss_after"]) < 5e-5
    assert abs(after_training["models"]["base"]["heldout_loss"] - status["eval_loss_before"]) < 5e-5


def test_eval_of_a_checkpoint_gives_the_loss_logged_at_its_step(tiny_run, prompt_file) -> None:
    run_dir, _ = tiny_run
    summary = evaluate.evaluate_run(run_dir, ["checkpoint=step-000005", "eval.prompts=null", "eval.compare_base=false"])
    assert summary["weights"] == "step-000005"
    assert abs(summary["models"]["tuned"]["heldout_loss"] - _logged_eval(run_dir)[5]) < 5e-5


def test_a_run_on_its_own_data_is_judged_on_its_held_out_records(tmp_path, prompt_file, capsys) -> None:
    """The demo's prompt file asks the demo model its name: on a user's own data it would score 0 and say
    nothing. Without a prompt file of theirs, the run's held-out records are asked, and the header says so."""
    data = write_jsonl(
        tmp_path / "geo.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"Capital of land {i}?"},
                    {"role": "assistant", "content": f"Town {i}"},
                ]
            }
            for i in range(60)
        ],
    )
    quick = ["eval.max_new_tokens=2", "eval.compare_base=false"]
    result = run(
        compose(
            [
                "+experiment=tiny",
                f"run.root={tmp_path}",
                f"data.path={data}",
                "train.max_steps=2",
                "eval.after_training=true",
            ]
            + quick
        )
    )
    printed = capsys.readouterr().out
    after_training = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    asked = [json.loads(line) for line in (result.run_dir / "eval" / "generations.jsonl").read_text().splitlines()]
    assert after_training["prompts_file"] is None and after_training["prompt_count"] == len(asked) == 6  # 10% held out
    assert after_training["prompts"].startswith(f"6 held-out records of data.path ({data})")
    assert all(row["expected"] == "Town " + row["prompt"].split()[-1].rstrip("?") for row in asked)
    assert f"prompts: {after_training['prompts']}" in printed and "judge noesis_accel.after.judges.contains" in printed
    assert str(DEMO_PROMPTS) not in printed

    assert evaluate.main([str(result.run_dir), "eval.heldout=false", *quick]) == 0  # the held-out set, no loss
    printed = capsys.readouterr().out
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    again = [json.loads(line) for line in (result.run_dir / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["expected"]) for r in again] == [(r["prompt"], r["expected"]) for r in asked]
    assert summary["prompts"] == after_training["prompts"] and f"prompts: {summary['prompts']}" in printed
    assert "heldout_loss" not in summary["models"]["tuned"]

    assert evaluate.main([str(result.run_dir), f"eval.prompts={prompt_file}", "eval.heldout=false", *quick]) == 0
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    assert summary["prompts_file"] == str(prompt_file) and summary["prompt_count"] == len(PROMPTS)
    assert f"prompts: {len(PROMPTS)} from {prompt_file}" in capsys.readouterr().out


def test_the_demo_data_is_still_judged_on_the_demo_prompt_file(tiny_run, capsys) -> None:
    run_dir, _ = tiny_run  # +experiment=tiny trains on the demo's sample data
    quick = ["eval.max_new_tokens=1", "eval.compare_base=false", "eval.heldout=false"]
    summary = evaluate.evaluate_run(run_dir, quick)
    assert Path(summary["prompts_file"]).samefile(DEMO_PROMPTS)
    assert summary["prompt_count"] == len(read_prompts(str(DEMO_PROMPTS)))
    assert f"prompts: {summary['prompt_count']} from {summary['prompts_file']}" in capsys.readouterr().out


def my_judge(prompt: str, answer: str, expected, record: dict, *, bonus: float = 0.0) -> tuple[float, str]:
    """A team judge: lives in its own module, plugged in by `eval.judge._target_` alone."""
    return 0.5 + bonus + (0.25 if "name" in record.get("tags", []) else 0.0), f"custom judge saw {len(answer)} chars"


class CountingJudge:
    """A class judge: built once with its options, then called per answer."""

    built = 0

    def __init__(self, weight: float) -> None:
        CountingJudge.built += 1
        self.weight = weight

    def __call__(self, prompt: str, answer: str, expected, record: dict) -> dict:
        return {"score": self.weight, "reason": "counted"}


def test_a_custom_judge_plugs_in_by_target_alone(tiny_run, prompt_file, capsys) -> None:
    run_dir, _ = tiny_run
    common = [str(run_dir), f"eval.prompts={prompt_file}", "eval.heldout=false", "eval.max_new_tokens=2"]
    assert evaluate.main(common + ["eval.judge._target_=test_after_training.my_judge", "+eval.judge.bonus=0.125"]) == 0
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "eval" / "generations.jsonl").read_text().splitlines()]
    assert summary["judge"] == "test_after_training.my_judge"
    assert [r["tuned"]["score"] for r in rows] == [0.875, 0.625, 0.625]
    assert all(r["tuned"]["reason"].startswith("custom judge saw") for r in rows)
    assert summary["models"]["base"]["by_tag"]["name"]["score_mean"] == 0.875

    CountingJudge.built = 0
    assert (
        evaluate.main(
            common
            + [
                "eval.judge._target_=test_after_training.CountingJudge",
                "+eval.judge.weight=0.3",
                "eval.compare_base=false",
            ]
        )
        == 0
    )
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert CountingJudge.built == 1 and summary["models"]["tuned"]["score_mean"] == pytest.approx(0.3)
    assert "test_after_training.CountingJudge" in capsys.readouterr().out


# ---------------------------------------------------------------- export


def test_export_loads_with_plain_transformers_and_equals_base_plus_adapter(tiny_run, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = tiny_run
    out = export_run(run_dir, out=tmp_path / "export", max_shard_size="5MB", log=lambda _: None)
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "model.safetensors.index.json",
        "training_config.yaml",
    } <= files
    assert len([f for f in files if f.endswith(".safetensors")]) >= 2  # sharded at 5MB
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    card = (out / "README.md").read_text()
    status = RunDir(run_dir).status()
    assert f"{status['eval_loss_before']:.4f}" in card and f"{status['eval_loss_after']:.4f}" in card
    assert "library_name: transformers" in card and "peft.r" not in card and "r: 8" in card

    merged = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert type(merged).__module__.startswith("transformers.") and merged.dtype == torch.float32
    assert not any("lora" in name for name, _ in merged.named_parameters())
    reference = load_run_model(run_config(RunDir(run_dir)), weights_source(RunDir(run_dir))).model
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        ours, theirs = merged(**ids).logits, reference(**ids).logits
        with reference.disable_adapter():
            base = reference(**ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(ours, base, atol=1e-4)  # the adapter is really in the weights


def test_every_exported_file_is_readable_by_all(tiny_run, tmp_path) -> None:
    """safetensors writes its files 0600; an export is for others to load, like every other file in it."""
    umask = os.umask(0o022)
    try:
        out = export_run(tiny_run[0], out=tmp_path / "export", max_shard_size="5MB", log=lambda _: None)
    finally:
        os.umask(umask)
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes) and set(modes.values()) == {"0o644"}, modes


def test_export_of_a_checkpoint_by_path(tiny_run, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    run_dir, _ = tiny_run
    checkpoint = run_dir / "checkpoints" / "step-000005"
    out = export_run(run_dir, checkpoint=checkpoint, out=tmp_path / "ck", log=lambda _: None)
    card = (out / "README.md").read_text()
    assert "checkpoint `step-000005`" in card and f"{_logged_eval(run_dir)[5]:.4f} (5)" in card
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    reference = load_run_model(run_config(RunDir(run_dir)), weights_source(RunDir(run_dir), checkpoint)).model
    final = load_run_model(run_config(RunDir(run_dir)), weights_source(RunDir(run_dir))).model
    ids = torch.tensor([[1, 520, 2040, 314, 346, 47]])
    with torch.no_grad():
        ours, theirs, last = merged(ids).logits, reference(ids).logits, final(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4) and not torch.allclose(ours, last, atol=1e-4)


def test_incomplete_checkpoints_are_refused_in_one_line(tiny_run, tmp_path) -> None:
    run_dir, _ = tiny_run
    fake = tmp_path / "step-000004"
    shutil.copytree(run_dir / "checkpoints" / "step-000005", fake)
    (fake / "model.safetensors").unlink()
    with pytest.raises(UserError, match="incomplete"):
        weights_source(RunDir(run_dir), fake)
    manifest = json.loads((fake / "manifest.json").read_text())
    manifest["files"].pop("model.safetensors")
    (fake / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="has no model.safetensors"):
        weights_source(RunDir(run_dir), fake)


@pytest.mark.slow
def test_export_of_a_deepspeed_zero2_checkpoint(zero2_two_process_reference, tmp_path) -> None:
    """ZeRO-2 checkpoints hold the engine's module state (pytorch_model/mp_rank_00_model_states.pt).

    The session's two-process ZeRO-2 run (tests/conftest.py, shared with tests/test_zero2.py): its last
    checkpoint is the final adapter, the one before it is not."""
    from transformers import AutoModelForCausalLM

    run_dir = RunDir(zero2_two_process_reference)
    newest, previous = f"step-{ZERO2_STEPS:06d}", f"step-{ZERO2_STEPS - 2:06d}"  # a checkpoint every 2 steps
    assert (run_dir.checkpoints / newest / "pytorch_model" / "mp_rank_00_model_states.pt").is_file()
    out = export_run(run_dir.path, checkpoint=newest, out=tmp_path / "export", log=lambda _: None)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    final = load_run_model(run_config(run_dir), weights_source(run_dir)).model  # the final adapter: same weights
    earlier = load_run_model(run_config(run_dir), weights_source(run_dir, previous)).model
    ids = torch.tensor([[1, 520, 2040, 314, 346, 47]])
    with torch.no_grad():
        ours, last, before = merged(ids).logits, final(ids).logits, earlier(ids).logits
    assert torch.allclose(ours, last, atol=1e-4) and not torch.allclose(before, last, atol=1e-4)


def test_a_full_finetune_exports_and_evaluates_too(tmp_path) -> None:
    """peft=none: the final weights are model/, and the "base" of the comparison is a second model."""
    from transformers import AutoModelForCausalLM

    result = run(compose(["+experiment=tiny", "peft=none", "train.max_steps=4", f"run.root={tmp_path}"]))
    status = RunDir(result.run_dir).status()
    summary = evaluate.evaluate_run(result.run_dir, ["eval.prompts=null"])
    assert summary["weights"] == "model"
    assert abs(summary["models"]["tuned"]["heldout_loss"] - status["eval_loss_after"]) < 5e-5
    assert abs(summary["models"]["base"]["heldout_loss"] - status["eval_loss_before"]) < 5e-5
    out = export_run(result.run_dir, out=tmp_path / "export", log=lambda _: None)
    assert "all weights trained (no LoRA)" in (out / "README.md").read_text()
    ids = torch.tensor([[1, 520, 2040, 314, 346, 47]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(out))(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(str(result.run_dir / "model"))(ids).logits
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- user mistakes, as a user sees them


@pytest.fixture(scope="module")
def run_without_adapter(tiny_run, tmp_path_factory) -> Path:
    """A run that stopped before writing its adapter: its config and status, no adapter/."""
    run_dir = tmp_path_factory.mktemp("stopped") / "tiny"
    run_dir.mkdir()
    shutil.copy(tiny_run[0] / "config.yaml", run_dir / "config.yaml")
    (run_dir / "status.json").write_text(json.dumps({"state": "interrupted", "step": 7}))
    return run_dir


def test_export_of_a_run_without_adapter_is_one_line(run_without_adapter) -> None:
    line = _one_line_error(_module(["noesis_accel.after.export", str(run_without_adapter)]))
    assert str(run_without_adapter) in line and "no final adapter" in line and "--checkpoint" in line


def test_eval_with_a_broken_prompt_line_names_file_and_line(tiny_run, tmp_path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [PROMPTS[0], '{"prompt": "Who are you?", "expected": "Noesis"'])
    line = _one_line_error(_module(["noesis_accel.after.evaluate", str(tiny_run[0]), f"eval.prompts={bad}"]))
    assert f"{bad}:2: invalid JSON" in line


def test_eval_with_a_judge_that_does_not_import_names_key_and_target(tiny_run, prompt_file) -> None:
    line = _one_line_error(
        _module(
            [
                "noesis_accel.after.evaluate",
                str(tiny_run[0]),
                f"eval.prompts={prompt_file}",
                "eval.judge._target_=tribunal_missing.judges.Tribunal",
            ]
        )
    )
    assert "eval.judge._target_" in line and "tribunal_missing.judges.Tribunal" in line


def test_push_to_hub_without_a_token_is_one_line_before_any_merge(tiny_run, tmp_path) -> None:
    no_token = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    line = _one_line_error(
        _module(["noesis_accel.after.export", str(tiny_run[0]), "--push-to-hub", "lyceum/noesis-tiny"], env=no_token)
    )
    assert "push_to_hub=lyceum/noesis-tiny: no Hugging Face token" in line
    assert not (tiny_run[0] / "export").exists()


def _main_error(main, args: list[str], capsys) -> str:
    """The same check in-process (no interpreter start-up): exit code 2 and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_more_user_mistakes_are_one_line(tiny_run, run_without_adapter, tmp_path, capsys, monkeypatch) -> None:
    from noesis_accel.after import export, report

    run_dir = str(tiny_run[0])
    assert "no final adapter" in _main_error(evaluate.main, [str(run_without_adapter)], capsys)
    assert "eval.nope" in _main_error(evaluate.main, [run_dir, "eval.nope=1"], capsys)
    assert "eval.max_new_tokens: must be > 0" in _main_error(evaluate.main, [run_dir, "eval.max_new_tokens=0"], capsys)
    assert "no such directory" in _main_error(export.main, [run_dir, "--checkpoint", "step-999999"], capsys)
    assert "not a run directory" in _main_error(report.main, [str(tmp_path)], capsys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in _main_error(export.main, [run_dir, "--push-to-hub", "lyceum/noesis-tiny"], capsys)
    assert not (tiny_run[0] / "export").exists()  # the hub checks come before the merge


# ---------------------------------------------------------------- report of a killed and resumed run


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """Checkpoints at 3, 6, ...; SIGKILL after step 5; the restart resumes at 3 and redoes 2 steps."""
    root = tmp_path_factory.mktemp("resumed")
    command = ["+experiment=tiny", f"run.root={root}", "train.max_steps=12", "ckpt.every=3", "train.eval_every=6"]
    crashed = run_cli(command, env={"NOESIS_FAULT": "step:5"})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = run_cli(command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return root / "tiny"


@pytest.mark.slow
def test_report_of_a_resumed_run_plots_metrics_and_marks_the_resume(resumed_run) -> None:
    from PIL import Image

    report = write_report(resumed_run)
    out = report.parent
    metrics = RunDir(resumed_run).metrics()
    with Image.open(out / "training.png") as image:
        assert image.size == (880, 560)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # lines, text and marks, not a blank canvas

    plotted = json.loads((out / "plotted.json").read_text())
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "eval_loss"):
        expected = [(m["step"], m[key]) for m in metrics if key in m]
        assert list(zip(plotted[key]["step"], plotted[key]["value"])) == expected, key
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))  # redone steps logged once
    assert plotted["marks"]["resume"] == [
        {"step": 3, "from": "step-000003", "attempt": 2, "lost_steps": 2, "lost_steps_exact": True}
    ]  # on a local disk every step was durable
    assert [m["step"] for m in plotted["marks"]["interruption"]] == [5]
    assert [m["step"] for m in plotted["marks"]["checkpoint"]] == [3, 6, 9, 12]

    # The figure itself: its lines carry the metrics and every panel shows the resume at step 3.
    figure = plots.build_figure(plotted, "test")
    for ax, (key, _, _) in zip(figure.axes, plots.PANELS):
        lines = {line.get_gid(): line for line in ax.get_lines()}
        assert list(lines[key].get_xdata()) == [m["step"] for m in metrics if key in m]
        assert list(lines[key].get_ydata()) == [m[key] for m in metrics if key in m]
        assert list(lines["resume"].get_xdata()) == [3, 3] and list(lines["interruption"].get_xdata()) == [5, 5]

    text = report.read_text()
    assert "![training curves](training.png)" in text
    assert "| 1 | killed" in text and "| 5 | step-000003 | 3 | 2 |" in text
    assert "2 step(s) done twice in all" in text and "| 12 | step-000012 | final |" in text
    assert "0 (no GPU: trained on 1 x cpu)" in text


# ---------------------------------------------------------------- units: judges, prompt file, config


def test_reference_judges() -> None:
    assert judges.exact("q", " noesis. ", "Noesis", {})[0] == 1.0
    assert judges.exact("q", "I am Noesis", "Noesis", {})[0] == 0.0
    assert judges.contains("q", "I am NOESIS!", "Noesis", {})[0] == 1.0
    assert judges.contains("q", "I am Noesis", "Noesis", {}, case_sensitive=True)[0] == 1.0
    assert judges.contains("q", "I am noesis", "Noesis", {}, case_sensitive=True)[0] == 0.0
    assert judges.contains("q", "seven days", ["7", "seven"], {})[0] == 1.0
    assert judges.contains("q", "anything", None, {}) == (None, "no expected answer")
    assert judges.regex("q", "Made by Lyceum Labs.", r"lyceum\s+labs", {})[0] == 1.0
    assert judges.regex("q", "Made by Lyceum Labs.", r"^lyceum", {})[0] == 0.0
    assert judges.regex("q", "x", "(", {})[0] is None


@pytest.mark.parametrize(
    "reply, score",
    [
        ("Score: 5 - fully correct", 1.0),
        ("**Score**: 3/5. Partly right", 0.5),
        ('{"score": 2, "reason": "no"}', 0.25),
        ("I would rate it 8 out of 10.", 0.8),
        ("4. It names Noesis", 0.75),
        ("score = 1", 0.0),
        ("The answer mentions Noesis.", None),
        ("Score: 9", None),
        ("", None),
    ],
)
def test_parse_score_reads_what_judge_models_write(reply: str, score) -> None:
    assert judges.parse_score(reply, 1, 5) == (pytest.approx(score) if score is not None else None)


def test_model_judge_prompts_a_chat_model_and_parses_its_score(tiny_run, monkeypatch, tmp_path) -> None:
    out = export_run(tiny_run[0], out=tmp_path / "judge-model", log=lambda _: None)
    judge, name = judges.load_judge(
        {
            "_target_": "noesis_accel.after.judges.ModelJudge",
            "name_or_path": str(out),
            "max_new_tokens": 3,
            "device": "cpu",
        }
    )
    assert name == "noesis_accel.after.judges.ModelJudge"
    assert "Expected answer: Noesis" in judge.question("What is your name?", "I am Noesis", "Noesis")
    score, reason = judge("What is your name?", "I am Noesis", "Noesis", {})  # a random 2-layer model: no score
    assert score is None and reason.startswith("no score in the judge's reply")
    seen = []
    monkeypatch.setattr(
        "noesis_accel.training.generate.reply", lambda model, tok, text, n: seen.append(text) or "Score: 4 - ok"
    )
    assert judge("What is your name?", "I am Noesis", "Noesis", {}) == (0.75, "Score: 4 - ok")
    assert "Assistant's answer: I am Noesis" in seen[0]


def test_load_judge_refuses_what_is_not_a_judge() -> None:
    with pytest.raises(ConfigError, match="eval.judge._target_: cannot import 'noesis_accel.after.judges.nope'"):
        judges.load_judge({"_target_": "noesis_accel.after.judges.nope"})
    with pytest.raises(ConfigError, match="must accept"):
        judges.load_judge({"_target_": "os.getcwd"})
    with pytest.raises(ConfigError, match="needs a _target_"):
        judges.load_judge({"case_sensitive": True})
    with pytest.raises(ConfigError, match="returned str"):
        judges.as_verdict("good", "x")
    judge, _ = judges.load_judge({"_target_": "noesis_accel.after.judges.contains", "case_sensitive": True})
    assert judge("q", "noesis", "Noesis", {})[0] == 0.0


def test_prompt_file_errors_name_the_line(tmp_path) -> None:
    good = read_prompts(str(write_jsonl(tmp_path / "ok.jsonl", PROMPTS + [""])))
    assert [p.tags for p in good] == [["name"], ["maker"], ["open"]] and good[1].expected == ["Lyceum Labs", "Lyceum"]
    for line, message in [
        ('{"expected": "x"}', "field 'prompt'"),
        ('{"prompt": "q", "expected": 3}', "field 'expected'"),
        ('["q"]', "must be a JSON object"),
        ('{"prompt": "q", "tags": [1]}', "field 'tags'"),
    ]:
        bad = write_jsonl(tmp_path / "bad.jsonl", [PROMPTS[0], line])
        with pytest.raises(DataError, match=f"{bad}:2: .*{message}"):
            read_prompts(str(bad))
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(str(tmp_path / "missing.jsonl"))


def test_demo_prompt_file_asks_name_maker_and_facts() -> None:
    records = read_prompts(str(REPO / "noesis_accel" / "assets" / "noesis_eval_prompts.jsonl"))
    tags = {t for r in records for t in r.tags}
    assert {"name", "maker", "fact"} <= tags and all(r.expected for r in records)
    sample = (REPO / "noesis_accel" / "assets" / "noesis_sample.jsonl").read_text()
    for record in records:  # every expected fact is what the training data teaches
        if "general" not in record.tags:
            assert any(alternative in sample for alternative in judges._alternatives(record.expected)), record.prompt


def test_eval_keys_do_not_change_the_math(tmp_path) -> None:
    plain = compose(["+experiment=tiny"])
    assert plain.eval.after_training is False and plain.eval.judge._target_ == "noesis_accel.after.judges.contains"
    changed = compose(["+experiment=tiny", "eval.after_training=true", "judge=exact", "eval.max_new_tokens=9"])
    assert changed.eval.judge._target_ == "noesis_accel.after.judges.exact"
    assert fingerprint(plain) == fingerprint(changed)  # a restart may turn evaluation on


def test_after_training_with_a_missing_judge_fails_before_training(tmp_path) -> None:
    from noesis_accel.processes.train import run

    cfg = compose(
        [
            "+experiment=tiny",
            f"run.root={tmp_path}",
            "eval.after_training=true",
            "eval.judge._target_=tribunal_missing.judge",
        ]
    )
    with pytest.raises(ConfigError, match="eval.judge._target_"):
        run(cfg)
    assert not (tmp_path / "tiny").exists()


# ---------------------------------------------------------------- the real demo (slow)


@pytest.fixture
def demo_run(demo_result) -> Path:
    """The session's one demo run (tests/conftest.py), shared with tests/test_demo.py."""
    return demo_result.run_dir


@pytest.mark.slow
def test_demo_export_gives_the_same_greedy_answers_as_base_plus_adapter(demo_run, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from noesis_accel.training.generate import load_finetuned, reply

    out = export_run(demo_run, out=tmp_path / "export")  # the demo's own export/ is test_serving_export's
    merged = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, no peft
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tuned, tuned_tokenizer = load_finetuned(typed(["+experiment=demo"]), demo_run / "adapter")
    prompts = read_prompts(str(REPO / "noesis_accel" / "assets" / "noesis_eval_prompts.jsonl"))
    questions = [p.prompt for p in prompts] + ["Where does the name Noesis come from?", "Who trained you?"]
    answers = [(reply(merged, tokenizer, q), reply(tuned, tuned_tokenizer, q)) for q in questions]
    assert all(ours == theirs for ours, theirs in answers), answers
    assert "Noesis" in answers[0][0]


@pytest.mark.slow
def test_demo_eval_prints_before_after_and_the_judge_prefers_the_tuned_model(demo_run, capsys) -> None:
    assert evaluate.main([str(demo_run)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((demo_run / "eval" / "summary.json").read_text())
    base, tuned = summary["models"]["base"], summary["models"]["tuned"]
    status = RunDir(demo_run).status()
    assert abs(tuned["heldout_loss"] - status["eval_loss_after"]) < 5e-5
    assert abs(base["heldout_loss"] - status["eval_loss_before"]) < 5e-5
    assert tuned["heldout_loss"] < 0.5 * base["heldout_loss"]
    assert f"{base['heldout_loss']:.4f}" in printed and f"{tuned['heldout_loss']:.4f}" in printed
    assert "judge score (mean)" in printed and "tuned answer" in printed
    assert tuned["score_mean"] > base["score_mean"]
    for tag in ("name", "maker"):
        assert tuned["by_tag"][tag]["score_mean"] > base["by_tag"][tag]["score_mean"], tag
    report = write_report(demo_run).read_text()
    assert "judge score (mean)" in report and f"{tuned['score_mean']:.3f}" in report
