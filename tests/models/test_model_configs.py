"""Config dataclasses: JSON round trip and validation."""
import json

import pytest

from hilt.models import BlockHierarchicalLMConfig, GPTConfig, HILTConfig


@pytest.mark.parametrize("cfg", [
    GPTConfig(d_model=32, n_heads=2, n_layers=3, pos_encoding="rope"),
    HILTConfig(d_model=32, n_heads=2, ilt_dim=16, ilt_layers=0, ilt_scale=0.05),
    BlockHierarchicalLMConfig(d_model=32, n_heads=2, block_size=4, n_decoder_layers=1),
    BlockHierarchicalLMConfig(d_model=32, n_heads=2, mode="encoder", n_classes=5, pos_encoding="sinusoidal"),
])
def test_config_round_trip(cfg, tmp_path):
    assert type(cfg).from_json(cfg.to_json()) == cfg
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert type(cfg).from_json(path) == cfg
    assert type(cfg).from_json(str(path)) == cfg
    d = json.loads(cfg.to_json())
    assert d["model_type"] == type(cfg).model_type
    assert d["d_ff"] == 4 * cfg.d_model  # None resolved to 4 * d_model


def test_config_field_names():
    assert {"vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "dropout", "max_seq_len",
            "pos_encoding"} <= set(GPTConfig().to_dict())
    assert {"ilt_dim", "ilt_heads", "ilt_layers", "ilt_dropout"} <= set(HILTConfig().to_dict())
    assert {"block_size", "n_local_layers", "n_global_layers", "n_decoder_layers"} <= set(
        BlockHierarchicalLMConfig().to_dict())
    assert GPTConfig().vocab_size == 256
    c = HILTConfig()
    assert (c.ilt_dim, c.ilt_heads, c.ilt_layers, c.ilt_dropout) == (128, 2, 2, 0.1)
    c = BlockHierarchicalLMConfig()
    assert (c.block_size, c.d_model, c.n_heads, c.mode) == (8, 128, 4, "decoder")


@pytest.mark.parametrize("cls,kwargs,field", [
    (GPTConfig, dict(d_model=30, n_heads=4), "d_model"),
    (GPTConfig, dict(pos_encoding="alibi"), "pos_encoding"),
    (GPTConfig, dict(dropout=1.5), "dropout"),
    (GPTConfig, dict(n_layers=0), "n_layers"),
    (GPTConfig, dict(vocab_size=True), "vocab_size"),
    (GPTConfig, dict(d_model=48, n_heads=16, pos_encoding="rope"), "rope"),
    (GPTConfig, dict(max_seq_len=0), "max_seq_len"),
    (HILTConfig, dict(ilt_dim=30, ilt_heads=4), "ilt_dim"),
    (HILTConfig, dict(ilt_layers=-1), "ilt_layers"),
    (HILTConfig, dict(ilt_dropout=-0.1), "ilt_dropout"),
    (BlockHierarchicalLMConfig, dict(block_size=0), "block_size"),
    (BlockHierarchicalLMConfig, dict(mode="seq2seq"), "mode"),
    (BlockHierarchicalLMConfig, dict(mode="encoder"), "n_classes"),
    (BlockHierarchicalLMConfig, dict(n_local_layers=-1), "n_local_layers"),
])
def test_config_validation(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_config_from_dict_rejects_unknown_and_wrong_type():
    d = GPTConfig().to_dict()
    d["n_layer"] = 3
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig.from_dict(d)
    with pytest.raises(ValueError, match="model_type"):
        HILTConfig.from_dict(GPTConfig().to_dict())
    assert GPTConfig.from_dict({"d_model": 64}).d_model == 64
