"""The CLOUD encoder and its heads, on the tiny size (each test runs in well under a second)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cloud_model.errors import ConfigError
from cloud_model.heads import (
    IGNORE_INDEX,
    CloudForDebye,
    CloudForMaskedLM,
    CloudForRegression,
    DebyeHeadConfig,
    RegressionHeadConfig,
    build_model,
)
from cloud_model.model import CloudConfig, CloudEncoder

VOCAB = 97
PAD, CLS = 0, 2


def _batch(
    B: int = 4, T: int = 12, seed: int = 0, vocab: int = VOCAB
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with [CLS] first and ragged lengths; pads are id 0 and masked out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)  # (B, T)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)  # (B,)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    ids[:, 0] = CLS
    ids[~mask] = PAD
    return ids, mask


def _tiny(**overrides: object) -> CloudEncoder:
    torch.manual_seed(0)
    return CloudEncoder(CloudConfig.named("tiny", VOCAB, **overrides)).eval()


def test_shapes_of_encoder_pool_and_heads() -> None:
    encoder = _tiny()
    ids, mask = _batch(B=3, T=10)
    hidden = encoder(ids, mask)
    assert hidden.shape == (3, 10, 64)
    assert encoder.pool(hidden, mask).shape == (3, 64)
    logits, loss = CloudForMaskedLM(encoder)(ids, mask)
    assert logits.shape == (3, 10, VOCAB) and loss is None
    head = RegressionHeadConfig(target_names=("a", "b"))
    z, _ = CloudForRegression(encoder, head)(ids, mask)
    assert z.shape == (3, 2)
    theta, _ = CloudForDebye(encoder, DebyeHeadConfig())(ids, mask)
    assert theta.shape == (3,)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_real_tokens_or_pooled_output(pooling: str) -> None:
    encoder = _tiny(pooling=pooling)
    ids, mask = _batch(B=4, T=10, seed=1)
    extra = 7
    ids_padded = torch.cat([ids, torch.full((4, extra), PAD)], dim=1)  # (B, T + extra)
    mask_padded = torch.cat([mask, torch.zeros(4, extra, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        h = encoder(ids, mask)
        h_padded = encoder(ids_padded, mask_padded)
        # the ids under the pads are irrelevant too
        ids_junk = ids_padded.clone()
        ids_junk[~mask_padded] = 42
        h_junk = encoder(ids_junk, mask_padded)
    torch.testing.assert_close(h_padded[:, :10][mask], h[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_junk[mask_padded], h_padded[mask_padded], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        encoder.pool(h_padded, mask_padded), encoder.pool(h, mask), atol=1e-5, rtol=1e-5
    )


def test_mlm_decoder_is_tied_to_token_embedding() -> None:
    encoder = _tiny()
    model = CloudForMaskedLM(encoder)
    assert model.head.decoder.weight is encoder.tok_emb.weight
    n_unique = len({p.data_ptr() for p in model.parameters()})
    assert n_unique == len(list(model.parameters()))  # parameters() deduplicates the tied matrix
    ids, mask = _batch()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 1] = ids[:, 1]
    _, loss = model(ids, mask, labels)
    assert loss is not None
    loss.backward()
    # the decoder's gradient lands on the embedding matrix, including rows never seen as input
    unseen = sorted(set(range(VOCAB)) - set(ids.flatten().tolist()))
    assert encoder.tok_emb.weight.grad is not None
    assert encoder.tok_emb.weight.grad[unseen].abs().sum() > 0
    # an untrained model is near-uniform over the vocabulary
    assert abs(loss.item() - math.log(VOCAB)) < 0.3


def test_named_sizes() -> None:
    tiny = CloudConfig.named("tiny", 600)
    small = CloudConfig.named("small", 600)
    base = CloudConfig.named("base", 600)
    assert (tiny.n_layer, tiny.d_model) == (2, 64)
    assert (base.n_layer, base.d_model, base.n_head, base.d_ff) == (12, 768, 12, 3072)
    small_params = CloudEncoder(small).num_parameters()
    assert small_params * 4 / 1e6 <= 20.0  # fp32 MB
    assert small.max_len == 64 and small.vocab_size == 600
    assert CloudConfig.named("tiny", 600, dropout=0.0).dropout == 0.0


def test_invalid_configs_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        CloudConfig.named("tiny", 50, n_head=3)
    with pytest.raises(ConfigError, match="unknown model size"):
        CloudConfig.named("huge", 50)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_len"):
        _tiny(max_len=8)(*_batch(T=9))


def test_flops_per_token_matches_torch_flop_counter() -> None:
    encoder = _tiny(dropout=0.0)
    B, T = 3, 16
    ids, mask = _batch(B=B, T=T)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(ids, mask)
    # the counter sees the linear layers; the fused CPU attention kernel is not counted, so
    # add its two (T x T x D) products per head by hand: 2 x 2 x n_layer x T x C per token
    attention = 4 * encoder.config.n_layer * T * encoder.config.d_model
    measured = counter.get_total_flops() / (B * T) + attention
    assert measured == pytest.approx(encoder.flops_per_token(T), rel=1e-9)


def test_regression_head_standardises_and_ignores_nan_targets() -> None:
    encoder = _tiny()
    model = CloudForRegression(encoder, RegressionHeadConfig(target_names=("e", "gap"))).eval()
    y = torch.tensor([[1.0, 10.0], [3.0, float("nan")], [5.0, 30.0], [7.0, 50.0]])
    model.head.set_target_stats(y)
    torch.testing.assert_close(model.head.target_mean, torch.tensor([4.0, 30.0]))
    torch.testing.assert_close(model.head.target_std, torch.tensor([math.sqrt(20 / 3), 20.0]))
    torch.testing.assert_close(model.head.destandardise(model.head.standardise(y[[0]])), y[[0]])
    ids, mask = _batch(B=4)
    z, loss = model(ids, mask, y)
    finite = torch.isfinite(y)
    expected = (z - model.head.standardise(y))[finite].abs().mean()
    assert loss is not None and torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.predict(ids, mask), model.head.destandardise(z.detach()))


def test_debye_head_is_positive_and_starts_near_its_scale() -> None:
    encoder = _tiny()
    model = CloudForDebye(encoder, DebyeHeadConfig(theta_scale=300.0, theta_min=1.0))
    ids, mask = _batch(B=8)
    theta, loss = model(ids, mask, torch.full((8,), 301.0))
    assert bool((theta > 0).all())
    assert float(theta.mean()) == pytest.approx(301.0, rel=0.05)
    assert loss is not None and float(loss) < 0.05
    # even a hugely negative pre-activation stays above theta_min
    with torch.no_grad():
        model.head.net[-1].bias.fill_(-1e4)
    assert float(model(ids, mask)[0].min()) >= 1.0


def test_build_model_reuses_a_given_encoder() -> None:
    encoder = _tiny()
    model = build_model(encoder.config, RegressionHeadConfig(target_names=("y",)), encoder=encoder)
    assert model.encoder is encoder
    with pytest.raises(ConfigError, match="differs"):
        build_model(CloudConfig.named("tiny", VOCAB + 1), DebyeHeadConfig(), encoder=encoder)


# ----------------------------------------------------------------- the encoder's steps


def test_forward_is_the_composition_of_its_steps_bitwise() -> None:
    encoder = _tiny(n_layer=3)
    ids, mask = _batch(B=5, T=16, seed=3)
    with torch.no_grad():
        hidden = encoder(ids, mask)  # (B, T, C)
        x = encoder.embed(ids)  # (B, T, C)
        for k in range(encoder.config.n_layer):  # one block at a time
            x = encoder.run_blocks(x, mask, start=k, stop=k + 1)
        assert torch.equal(encoder.final_norm(x), hidden)
        # any cut: bottom blocks then top blocks is the whole stack
        for cut in range(encoder.config.n_layer + 1):
            below = encoder.run_blocks(encoder.embed(ids), mask, stop=cut)
            assert torch.equal(
                encoder.final_norm(encoder.run_blocks(below, mask, start=cut)), hidden
            )
        assert torch.equal(encoder.run_blocks(x, mask, start=3), x)  # empty range: unchanged
        assert torch.equal(encoder.encode(ids, mask), hidden[:, 0])  # cls pooling
        mean = encoder.pool(hidden, mask, "mean")  # (B, C)
        expected = torch.stack([hidden[i, mask[i]].mean(0) for i in range(len(ids))])
        assert torch.allclose(mean, expected, atol=1e-6)


def test_steps_validate_lengths_and_masks() -> None:
    encoder = _tiny()
    ids, mask = _batch(T=12)
    with pytest.raises(ConfigError, match="max_len"):
        encoder.embed(torch.zeros(1, encoder.config.max_len + 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="mask shape"):
        encoder.run_blocks(encoder.embed(ids), mask[:, :-1])


def test_trunk_cuts_reuse_the_encoder_steps_bitwise() -> None:
    """Frozen trunk features + a member copied from the encoder's top = the whole encoder."""
    from cloud_model.configs import FinetuneConfig
    from cloud_model.finetune import MemberNet
    from cloud_model.trunk import member_spec, trunk_features

    encoder = _tiny(n_layer=3, dropout=0.0)
    ids, mask = _batch(B=6, T=14, seed=5)
    head = RegressionHeadConfig(target_names=("y",), dropout=0.0)
    with torch.no_grad():
        cuts = ((0, "cls", True), (1, "mean", True), (3, "cls", False), ("all", "mean", True))
        for n_top, pooling, embeddings in cuts:  # pooled, hidden, hidden below nothing, ids
            config = FinetuneConfig(
                n_trainable_blocks=n_top, pooling=pooling, train_embeddings=embeddings
            )
            spec = member_spec(encoder.config, config, head)
            member = MemberNet(spec, encoder).eval()
            out = member(
                trunk_features(encoder, spec, ids, mask), None if spec.kind == "pooled" else mask
            )
            expected = member.head(encoder.pool(encoder(ids, mask), mask, pooling))
            assert torch.equal(out, expected), (n_top, pooling, spec.kind)
