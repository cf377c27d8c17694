"""`noesis plan`: the 8B recipe counted on the meta device, and the plan against the tensors of a real first step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import typed

from noesis_accel.training import footprint
from noesis_accel.training.plan import PLAN_FILE, fit_problem, make_plan, read_plan

LLAMA3_8B_PARAMS = 8.03e9
# LoRA r16 on every linear layer of Llama-3-8B but the LM head, by hand: per layer q, o 16 x (4096 + 4096);
# k, v 16 x (4096 + 1024); gate, up, down 16 x (4096 + 14336); 32 layers.
LLAMA3_8B_LORA16 = 32 * (2 * 16 * 8192 + 2 * 16 * 5120 + 3 * 16 * 18432)


def test_the_8b_recipe_is_planned_without_weights_and_a_t4_is_refused_for_its_base_weights(tmp_path: Path) -> None:
    cfg = typed(["+experiment=noesis", f"run.root={tmp_path}", "modal.gpu=[H100:8,T4:8]"])
    plan = make_plan(cfg)
    params = plan.model.params
    assert abs(params.base_params - LLAMA3_8B_PARAMS) / LLAMA3_8B_PARAMS < 0.005
    assert params.trainable_params == LLAMA3_8B_LORA16
    # What peft itself reports for the adapter, built on the meta device.
    model = footprint.meta_model(cfg, footprint.model_shape(cfg.model))
    assert model.get_nb_trainable_parameters() == (
        params.trainable_params,
        params.base_params + params.trainable_params,
    )
    h100, t4 = plan.gpus
    names = [term.name for term in h100.terms]
    for name in ("base weights", "trainable weights", "gradients", "optimizer state", "activations", "logits"):
        assert name in names
    assert h100.fits and h100.usd and h100.usd > 0 and h100.device_hours and plan.data.steps == 750
    assert not t4.fits and t4.largest.name == "base weights"
    problem = fit_problem(plan, cfg)
    assert problem is not None and problem.startswith("plan: T4:8 does not fit") and "base weights" in problem


@pytest.mark.slow
def test_noesis_plan_refuses_a_t4_in_one_line_with_exit_2_and_fits_an_h100(tmp_path: Path) -> None:
    refused = run_cli(
        ["+experiment=noesis", f"run.root={tmp_path}", "modal.gpu=T4:8"], module="noesis_accel.training.plancli"
    )
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "base weights" in errors[0] and "Traceback" not in refused.stderr
    fits = run_cli(["+experiment=noesis", f"run.root={tmp_path}"], module="noesis_accel.training.plancli")
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "8,030,261,248 in the base" in fits.stdout and "fits" in fits.stdout and "$" in fits.stdout
    assert read_plan(tmp_path / "noesis") is not None


def _first_step_against_plan(tmp_path: Path, experiment: str, extra: list[str] = ()) -> None:
    """Train one optimizer step of `experiment` and compare its tensors and its allocation peak with the plan.

    The peak is the profiler's running sum of the CPU allocator's allocations and frees: tensor bytes, the
    CPU's counterpart of torch.cuda.max_memory_allocated (process RSS would add Python and allocator caches).
    """
    from torch.profiler import ProfilerActivity, profile

    from noesis_accel.training.trainer import Trainer

    overrides = [f"+experiment={experiment}", f"run.root={tmp_path}", "train.tracker=none", "train.eval_every=0"]
    cfg = typed([*overrides, "data.eval_fraction=0", "train.progress_bar=false", *extra])
    trainer = Trainer.for_config(cfg)
    try:
        plan = make_plan(cfg, prepared=trainer.data, vocab_size=len(trainer.tokenizer))
        terms = {term.name: term.bytes for term in plan.first.terms}
        model = trainer.accelerator.unwrap_model(trainer.model)
        grads: dict[int, int] = {}
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(
                    lambda p: grads.__setitem__(id(p), p.grad.numel() * p.grad.element_size())
                )
        trainer.total_steps = 1
        trainer.model.train()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer._train_epoch()
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        assert terms["base weights"] == frozen
        assert terms["trainable weights"] == trainable
        assert terms["gradients"] == sum(grads.values())
        assert terms["optimizer state"] == footprint.actual_state_bytes(trainer.optimizer)
        events = sorted(
            (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
        )
        level = peak = 0
        for event in events:
            level += event.nbytes()
            peak = max(peak, level)
        # What the step adds besides the activations is exact (gradients and the optimizer's new state).
        activations = peak - terms["gradients"] - terms["optimizer state"]
        planned = terms["activations"] + terms["logits"]
        assert abs(planned - activations) / activations <= 0.30, (planned, activations)
        assert read_plan(trainer.rundir.path) is not None  # the trainer wrote its plan.json
        assert (trainer.rundir.path / PLAN_FILE).is_file()
    finally:
        trainer.session.close()


def test_the_plan_of_the_tiny_model_equals_its_tensors_and_its_first_step(tmp_path: Path) -> None:
    _first_step_against_plan(tmp_path, "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model.gradient_checkpointing=true"]], ids=["plain", "checkpointing"])
def test_the_plan_of_the_demo_model_equals_its_tensors_and_its_first_step(tmp_path: Path, extra: list[str]) -> None:
    """In a fresh interpreter: in one long session the measured peak moved with the tests run before it
    (seen once in CI, with checkpointing: 368 MB of activations measured against 498 MB planned, where the
    same test alone measures within the 30%). What shifts it is not known yet; alone it is stable."""
    code = (
        "import pathlib, test_plan; "
        f"test_plan._first_step_against_plan(pathlib.Path({str(tmp_path)!r}), 'demo', {extra!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_plan_of_local_data_counts_its_records_and_steps_exactly(tmp_path: Path) -> None:
    cfg = typed(["+experiment=tiny", f"run.root={tmp_path}"])
    plan = make_plan(cfg)
    assert plan.data.exact and plan.data.records == 162 and plan.data.steps == 20
    assert plan.first.device == "cpu" and plan.first.fits
    assert torch.is_tensor(torch.zeros(1))  # the plan left torch usable (nothing stays on the meta device)


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, patched: bool, gpu: bool) -> int:
    """Bytes autograd keeps for one training forward (each storage once, parameters left out)."""
    params = {id(p) for p in model.parameters()}
    kept: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # so that no two saved tensors share an id

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in params:
            kept[id(base)] = base.numel() * base.element_size()
            alive.append(base)
        return tensor

    model.train()
    kernels = (
        footprint._kernels_on_meta(model, gpu)
        if patched
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    )
    with kernels, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = model(input_ids=ids, labels=ids, attention_mask=mask)
    del outputs
    return sum(kept.values())


def test_attention_and_dropout_are_counted_as_the_training_device_keeps_them(tmp_path: Path) -> None:
    """On the meta device torch runs the math attention, which keeps rows x heads x L x L probabilities that
    the fused kernels never store (1 GiB a layer for the 8B recipe), and dropout with a mask in the input's
    dtype where CUDA keeps one byte a value. The meta count must equal the CPU's real kernels, and differ
    on a GPU by exactly the dropout masks' three bytes a value."""
    cfg = typed(["+experiment=tiny", f"run.root={tmp_path}", "model.attn_implementation=sdpa", "peft.dropout=0.1"])
    shape = footprint.model_shape(cfg.model, vocab_size=1000)
    rows, length = 2, 256  # long enough that probabilities (2 x 4 x 256 x 256 x 4 bytes a layer) would show
    torch.manual_seed(0)
    real = footprint.meta_model(cfg, shape).to_empty(device="cpu")
    ids = torch.randint(0, 100, (rows, length))
    mask = torch.ones(rows, 1, length, length, dtype=torch.bool)
    on_cpu = _saved_bytes(real, ids, mask, patched=False, gpu=False)
    meta = footprint.meta_model(cfg, shape)
    meta_ids, meta_mask = ids.to("meta"), mask.to("meta")
    assert _saved_bytes(meta, meta_ids, meta_mask, patched=True, gpu=False) == on_cpu
    assert _saved_bytes(meta, meta_ids, meta_mask, patched=False, gpu=False) > on_cpu  # the math kernel's extra
    # Dropout keeps a mask only where its input needs a gradient: not for the first layer's q, k and v,
    # whose input (the frozen embeddings, through a frozen norm) needs none.
    first_qkv = {f"layers.0.self_attn.{proj}.lora_A.default" for proj in ("q_proj", "k_proj", "v_proj")}
    masks = sum(
        rows * length * module.in_features
        for name, module in meta.named_modules()
        if name.endswith("lora_A.default") and not any(name.endswith(skip) for skip in first_qkv)
    )
    assert on_cpu - _saved_bytes(meta, meta_ids, meta_mask, patched=True, gpu=True) == 3 * masks


def test_an_fsdp2_plan_shards_each_term_and_counts_the_units_gathered_whole(tmp_path: Path) -> None:
    """The same run on 2 processes: DDP holds everything on each; FSDP2 half of each term, plus the units it
    gathers whole (here the tiny model's embeddings make up nearly all of it)."""
    two = [f"run.root={tmp_path}", "+experiment=tiny", "distributed.num_processes=2"]
    ddp = {t.name: t.bytes for t in make_plan(typed([*two, "distributed=ddp"])).first.terms}
    fsdp2 = {t.name: t.bytes for t in make_plan(typed([*two, "distributed=fsdp2"])).first.terms}
    for name in ("base weights", "trainable weights", "optimizer state"):
        assert fsdp2[name] == -(-ddp[name] // 2), name
    assert fsdp2["gradients"] == fsdp2["trainable weights"]  # reduce-scattered: no bucket copy
    assert ddp["base weights"] <= fsdp2["gathered units (FSDP2)"] <= 2 * ddp["base weights"]
    assert "gathered units (FSDP2)" not in ddp
