"""Codecs and the compression stage: round trips, unbiasedness, exact byte counts, error feedback, the order with DP."""

import math

import pytest
import torch

from flexp.client import ClientResult
from flexp.compression.bits import pack, packed_size, unpack
from flexp.compression.codecs import Quantizer, RandomMask, Sign, TopK
from flexp.compression.stage import QuantizeDownload, QuantizeUpdates, SignUpdates, TopKUpdates
from flexp.privacy.clip import clipped
from flexp.privacy.dp_fedavg import DPFedAvg, within_clip
from flexp.rng import client_key
from flexp.stage import Plan, Staged
from flexp.strategy.fedavg import FedAvg

PLAN = Plan(clients=8, per_round=4, sampling="fixed", rounds=3, seed=2, local_epochs=1, batch_size=10)
EPS64 = torch.finfo(torch.float64).eps


def _vector(n, seed=0, dtype=torch.float32):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _wire_size(message):
    """The bytes of the message's tensors serialized as raw buffers: what a client would put on the wire."""
    return sum(len(t.contiguous().numpy().tobytes()) for t in message.parts.values())


@pytest.mark.parametrize("bits", range(1, 17))
def test_packing_codes_of_every_width_is_lossless_and_takes_ceil_n_bits_over_8_bytes(bits):
    n = 1001
    codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes.to(torch.uint8 if bits <= 8 else torch.int32), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, n, bits).to(torch.int64), codes)


@pytest.mark.parametrize("codec", [TopK(1.0), RandomMask(1.0, scaled=False), Sign()], ids=repr)
def test_lossless_settings_decode_exactly(codec):
    x = _vector(3000, 1)
    if isinstance(codec, Sign):  # lossless on vectors of one magnitude
        x = x.sign() * 0.25
    assert torch.equal(codec.decode(codec.encode(x, key=7)), x)


def test_quantization_is_exact_on_its_grid():
    x = torch.arange(256, dtype=torch.float32) - 100  # 256 evenly spaced values: the 8-bit grid of their block
    codec = Quantizer(bits=8, block=256)
    assert torch.equal(codec.decode(codec.encode(x, key=3)), x)


@pytest.mark.parametrize("codec", [Quantizer(bits=2, block=64), Quantizer(bits=2, block=64, rotate=True),
                                   RandomMask(0.25)], ids=repr)
def test_unbiased_codecs_decode_to_the_input_on_average(codec):
    """Over N keys the mean decode's error per value has std <= sd/sqrt(N), where sd bounds one decode's: a
    stochastic rounding to a grid of step s has sd <= s/2 (rotated: the same, as the rotation is orthonormal); a
    random mask keeping a value with probability p, scaled by 1/p, has sd = |x| sqrt((1-p)/p). 6 sd bounds all
    the values' errors at once (p < 1e-6 per value)."""
    x, draws = _vector(300, 2), 400
    decoded = torch.stack([codec.decode(codec.encode(x, key=k)) for k in range(draws)])
    if isinstance(codec, Quantizer):
        steps = torch.stack([codec.encode(x, key=k).parts["step"].max() for k in range(draws)])
        sd = torch.full_like(x, float(steps.max()) / 2)
    else:
        sd = x.abs() * math.sqrt((1 - codec.ratio) / codec.ratio)
    assert ((decoded.mean(0) - x).abs() <= 6 * sd / math.sqrt(draws) + 1e-6).all()
    assert not torch.equal(decoded[0], decoded[1])  # the key draws: different keys, different roundings


def test_stochastic_rounding_moves_each_value_to_a_neighbouring_level():
    x = _vector(5000, 3)
    codec = Quantizer(bits=4, block=1024)
    message = codec.encode(x, key=11)
    step = message.parts["step"].repeat_interleave(1024)[:5000]
    assert ((codec.decode(message) - x).abs() <= step * (1 + 1e-5)).all()


@pytest.mark.parametrize("codec, expected", [
    (Quantizer(bits=8, block=1024), 10_000 + 10 * 8),  # 1 byte a code; (min, step) as float32 per block of 1024
    (Quantizer(bits=4, block=1024), 5_000 + 10 * 8),
    (Quantizer(bits=3, block=1024), math.ceil(10_000 * 3 / 8) + 10 * 8),
    (Quantizer(bits=8, block=1024, rotate=True), 10 * 1024 + 10 * 8 + 8),  # padded to whole blocks; the 8-byte key
    (TopK(0.01), 100 * 4 + 100 * 4),  # k float32 values and k int32 indices
    (TopK(0.5), 5_000 * 4 + 10_000 // 8),  # k values and a bitmask, smaller than k indices
    (RandomMask(0.01), None),  # the kept values (a random count) and the 8-byte key
    (Sign(), 10_000 // 8 + 4),  # one bit a value and one float32 scale
], ids=repr)
def test_byte_counts_are_the_size_of_the_encoded_message(codec, expected):
    x = _vector(10_000, 4)
    message = codec.encode(x, key=5)
    assert message.nbytes == _wire_size(message)
    if expected is None:
        expected = 4 * int((codec.decode(message) != 0).sum()) + 8
    assert message.nbytes == expected


def _reply(client, params):
    return ClientResult(client, params, num_samples=10 + client, loss=0.5, steps=3)


@pytest.mark.parametrize("stage", [TopKUpdates(PLAN, ratio=0.05), SignUpdates(PLAN),
                                   QuantizeUpdates(PLAN, bits=2, error_feedback=True)], ids=lambda s: type(s).__name__)
def test_error_feedback_conserves_the_update(stage):
    """sent + new residual = update + old residual, client by client, over rounds (float64: what rounding allows is
    a few eps of the largest value)."""
    params = _vector(2000, 5, torch.float64)
    owed = {c: torch.zeros_like(params) for c in (1, 3)}
    for round_ in (1, 2, 3):
        for client in (1, 3):
            update = _vector(2000, 10 * round_ + client, torch.float64)
            out = stage.client(round_, params, _reply(client, params + update))
            sent = out.params - params
            scale = float((params.abs() + update.abs() + owed[client].abs()).max())
            torch.testing.assert_close(sent + stage.residual[client], update + owed[client], rtol=0,
                                       atol=8 * EPS64 * scale)
            assert out.sent_bytes == stage.codec.encode(update + owed[client], 0).nbytes
            owed[client] = stage.residual[client]
        assert all(r.abs().sum() > 0 for r in stage.residual.values())


def test_without_error_feedback_no_residual_is_kept_and_the_state_is_empty():
    stage = QuantizeUpdates(PLAN, bits=4)
    params = _vector(500, 6)
    stage.client(1, params, _reply(0, params + _vector(500, 7)))
    assert stage.residual == {} and stage.state_dict() == {}


def test_a_codec_after_dp_clipping_runs_clip_encode_decode_reclip_then_noise_in_that_order():
    """The documented order: the client clips (privacy), then encodes its update in the model's dtype (compression);
    the server decodes, clips the decoded update again (a codec may lengthen it: 1-bit quantization does), sums,
    noises and divides by the fixed denominator. With noise 0 the result is that composition computed by hand."""
    clip, params = 0.5, _vector(3000, 8)
    replies = [_reply(c, params + 0.1 * _vector(3000, 20 + c)) for c in range(4)]
    codec = QuantizeUpdates(PLAN, bits=1).codec
    staged = Staged(FedAvg(), {"privacy": DPFedAvg(clip=clip, noise_multiplier=0.0, plan=PLAN),
                               "compression": QuantizeUpdates(PLAN, bits=1)})
    received = [staged.receive(1, params, r) for r in replies]
    result = staged.aggregate(1, params, received)

    total, lengthened = torch.zeros(3000, dtype=torch.float64), 0
    for reply in replies:  # each step as the stages compute it: weights in float64, updates taken from them
        clipped_weights = params.double() + clipped(reply.params.double() - params.double(), clip)[0]
        update = (clipped_weights - params).float()  # sent in the model's dtype
        decoded = codec.decode(codec.encode(update, client_key(PLAN.seed, 1, reply.client)))
        lengthened += float(decoded.norm()) > clip
        total += within_clip((params + decoded).double() - params.double(), clip)
    assert lengthened, "the example must exercise the server's second clip"
    expected = (params.double() + total / PLAN.per_round).float()
    torch.testing.assert_close(result, expected, rtol=0, atol=float(expected.abs().max()) * 2 ** -23)
    assert all(r.sent_bytes == codec.encode(torch.zeros(3000), 0).nbytes for r in received)


def test_download_quantization_starts_every_client_from_the_same_rounded_weights_and_counts_its_bytes():
    from flexp.algorithm import held_tensors
    from flexp.fedavg import rebased

    staged = Staged(FedAvg(), {"compression": TopKUpdates(PLAN, ratio=1.0, error_feedback=False, download_bits=8)})
    params = _vector(4096, 9)
    start, nbytes = staged.broadcast(4, params)
    assert nbytes == 4096 + 4 * 8 and not torch.equal(start, params)
    assert ((start - params).abs() <= (params.max() - params.min()) / 255).all()
    assert torch.equal(staged.broadcast(4, params)[0], start)  # one draw per round, the same for every client
    alone = Staged(FedAvg(), {"compression": QuantizeDownload(PLAN, download_bits=8)})
    assert torch.equal(alone.broadcast(4, params)[0], start)  # compression=download: the same broadcast, ...
    assert alone.receive(4, params, _reply(1, params + 1)).sent_bytes is None  # ... and updates sent in full
    moved = rebased(_reply(2, start + 1.0), start, params)  # the client moved every weight by 1 from its start
    reply = staged.receive(4, params, moved)
    assert torch.allclose(reply.params - params, torch.ones(4096), atol=1e-5)  # applied to the global weights
    assert held_tensors(staged) == {}  # the broadcast is not state: nothing a checkpoint would miss


def test_an_algorithm_that_still_defines_wire_bytes_is_warned_that_it_is_not_called(caplog):
    from flexp.job import warn_retired_hooks

    class Old(FedAvg):
        def wire_bytes(self, model_bytes):
            return 2 * model_bytes

    warn_retired_hooks(FedAvg())
    assert not caplog.records
    warn_retired_hooks(Old())
    assert "Old.wire_bytes is no longer called" in caplog.text


def test_after_dp_fedavg_a_codec_encodes_and_counts_the_update_in_the_models_dtype():
    """DP-FedAvg clips in float64; the codec still sends float32 values and scales, as a device would."""
    params = _vector(3000, 10)
    staged = Staged(FedAvg(), {"privacy": DPFedAvg(clip=10.0, noise_multiplier=0.0, plan=PLAN),
                               "compression": TopKUpdates(PLAN, ratio=0.01)})
    reply = staged.receive(1, params, _reply(0, params + 0.1 * _vector(3000, 11)))
    assert reply.sent_bytes == 30 * 4 + 30 * 4  # 30 float32 values and their int32 indices
    assert staged.stages["compression"].residual[0].dtype == torch.float32


@pytest.mark.parametrize("overrides, named", [
    (["compression=quantize", "compression.rotate=true", "compression.download_bits=4"], " quantize8 rot down4 "),
    (["compression=download"], " download8 "),
    (["compression=topk", "system=heavy_tailed", "system.over_select=0.3", "system.deadline=30"],
     " topk0.01 ef heavy_tailed os0.3 dl30 "),
    (["compression=random_mask", "system=uniform"], " random_mask0.01 uniform ")])
def test_run_names_say_the_codec_and_the_devices(overrides, named):
    from flexp.api import compose, experiment
    from flexp.job import run_name

    assert named in run_name(experiment(compose(["dataset=synthetic", "model=logreg", "fl.clients=10", *overrides])))
