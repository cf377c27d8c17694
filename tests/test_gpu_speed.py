"""GPU checks of the speed options (skipped without CUDA): packing through sdpa on the GPU, and Liger's
kernels keeping our loss (summed token losses / the global batch's label tokens) and its gradients.

Both compare float32 runs of the tiny model from the same seed; tolerances: losses 1e-4 relative,
gradients 1e-3 of each tensor's largest entry (Liger's Triton kernels sum in another order).
"""

from __future__ import annotations

import pytest
import torch
from helpers import typed

from noesis_accel.training.data import PaddingCollator
from noesis_accel.training.modeling import build_model
from noesis_accel.training.packing import PackingCollator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = (37, 120, 5, 64)


def _rows() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(3, 250, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    return rows


def _loss_and_grads(overrides: list[str], collate, label_tokens: int = 97) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = typed(["+experiment=tiny", "train.device=auto", "peft.dropout=0", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.peft, 256, device_is_cuda=True).train()  # Liger fuses the loss in training
    with torch.no_grad():  # LoRA's B starts at zero; give it values so every adapter matrix gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    batch = {k: v.cuda() for k, v in collate(_rows()).items()}
    loss = model(**batch, num_items_in_batch=label_tokens).loss
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == reference.keys()
    for name, expected in reference.items():
        scale = float(expected.abs().max())
        assert float((grads[name] - expected).abs().max()) <= 1e-3 * max(scale, 1e-12), name


def test_packed_sdpa_matches_padded_on_the_gpu() -> None:
    padded_loss, padded = _loss_and_grads(["model.attn_implementation=sdpa"], PaddingCollator(0))
    packed_loss, packed = _loss_and_grads(["model.attn_implementation=sdpa"], PackingCollator())
    assert packed_loss == pytest.approx(padded_loss, rel=1e-4)
    _assert_close(packed, padded)


def test_liger_keeps_the_token_weighted_loss_and_its_gradients() -> None:
    """Run last in this file: Liger's RoPE patch is module-wide and stays for the rest of the process."""
    plain_loss, plain = _loss_and_grads([], PaddingCollator(0))
    liger_loss, liger = _loss_and_grads(["model.liger=true"], PaddingCollator(0))
    assert liger_loss == pytest.approx(plain_loss, rel=1e-4)
    _assert_close(liger, plain)
    # The divisor is ours: twice the label tokens halves the loss (a mean would not change).
    halved, _ = _loss_and_grads(["model.liger=true"], PaddingCollator(0), label_tokens=2 * 97)
    assert halved == pytest.approx(liger_loss / 2, rel=1e-5)
