"""EMA of parameters, checked against closed forms computed by hand."""

import io
from fractions import Fraction

import pytest
import torch

from sdswarm.model.ema import EMA


def _param(value: float, n: int = 3) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.full((n,), value))


def _run(ema: EMA, p: torch.nn.Parameter, values) -> None:
    for v in values:
        with torch.no_grad():
            p.fill_(v)
        ema.update([p])


def test_warmup_closed_form():
    # shadow_0 = 0; params 1, 2, 3 at steps t = 1, 2, 3 with d_t = (1 + t) / (10 + t) = 2/11, 3/12, 4/13:
    # s1 = 9/11; s2 = 3/12 * 9/11 + 9/12 * 2 = 75/44; s3 = 4/13 * 75/44 + 9/13 * 3 = 372/143 (= 2.6014).
    # A constant decay of 0.5 would give 0.5, 1.25, 2.125 instead.
    p = _param(0.0)
    ema = EMA([p], decay=0.9999)
    expected = [Fraction(9, 11), Fraction(75, 44), Fraction(372, 143)]
    for t, (v, e) in enumerate(zip([1.0, 2.0, 3.0], expected, strict=True), start=1):
        _run(ema, p, [v])
        assert ema.num_updates == t
        torch.testing.assert_close(ema.shadow[0], torch.full((3,), float(e)))
    assert abs(float(expected[-1]) - 2.125) > 0.4


def test_warmup_capped_by_decay():
    # decay 0.2: d = min(0.2, 2/11) = 2/11, then 0.2, 0.2 -> s1 = 9/11, s2 = 0.2 * 9/11 + 0.8 * 2 = 97/55,
    # s3 = 0.2 * 97/55 + 0.8 * 3 = 757/275.
    p = _param(0.0)
    ema = EMA([p], decay=0.2)
    _run(ema, p, [1.0, 2.0, 3.0])
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 757 / 275))
    assert [ema.decay_at(t) for t in (1, 2, 3)] == [2 / 11, 0.2, 0.2]


def test_constant_decay_without_warmup():
    p = _param(0.0)
    ema = EMA([p], decay=0.5, warmup=False)
    _run(ema, p, [1.0, 2.0, 3.0])  # 0.5, 1.25, 2.125
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 2.125))


def test_update_does_not_touch_grads_or_params():
    p = _param(1.0)
    ema = EMA([p])
    (p * 2).sum().backward()
    ema.update([p])
    assert not ema.shadow[0].requires_grad
    torch.testing.assert_close(p.detach(), torch.full((3,), 1.0))


def test_low_precision_params_kept_in_fp32():
    # 1e-4 steps are invisible in bf16 around 1.0 (spacing 2**-7); the fp32 shadow must keep them.
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    ema = EMA([p], decay=0.9999, warmup=False)
    with torch.no_grad():
        p.fill_(1.0)
    for _ in range(10):
        ema.update([p])
    assert ema.shadow[0].dtype == torch.float32
    torch.testing.assert_close(ema.shadow[0], torch.full((4,), 1 - 0.9999**10))
    ema.copy_to([p])
    assert p.dtype == torch.bfloat16


def test_state_dict_round_trip():
    p = _param(0.0)
    ema = EMA([p], decay=0.9999)
    _run(ema, p, [1.0, 2.0])
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    q = _param(5.0)
    restored = EMA([q], decay=0.5, warmup=False)  # overwritten by the loaded state
    restored.load_state_dict(torch.load(buf))
    assert restored.num_updates == 2 and restored.decay == 0.9999 and restored.warmup
    torch.testing.assert_close(restored.shadow[0], torch.full((3,), 75 / 44))
    # Continuing uses the restored step count: t = 3 -> same value as an uninterrupted run.
    _run(restored, q, [3.0])
    torch.testing.assert_close(restored.shadow[0], torch.full((3,), 372 / 143))


def test_load_state_dict_rejects_mismatch():
    ema = EMA([_param(0.0, n=3)])
    with pytest.raises(ValueError):
        ema.load_state_dict(EMA([_param(0.0, n=4)]).state_dict())


def test_swapped_in_and_restore():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ema = EMA(model.parameters(), decay=0.5, warmup=False)
    original = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model.parameters())  # shadow = original + 0.5
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in(model.parameters()):
        for p, o in zip(model.parameters(), original, strict=True):
            torch.testing.assert_close(p.detach(), o + 0.5)
    for p, t in zip(model.parameters(), trained, strict=True):
        torch.testing.assert_close(p.detach(), t)
    with pytest.raises(RuntimeError), ema.swapped_in(model.parameters()):
        raise RuntimeError("sampling failed")
    for p, t in zip(model.parameters(), trained, strict=True):
        torch.testing.assert_close(p.detach(), t)


def test_copy_to():
    p = _param(0.0)
    ema = EMA([p], decay=0.5, warmup=False)
    _run(ema, p, [4.0])  # shadow 2.0, param 4.0
    ema.copy_to([p])
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0))
