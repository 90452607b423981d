"""A tiny model configuration and a one-thread fixture shared by the model-level tests."""

from __future__ import annotations

import pytest
import torch

from facial_perception.core.config import ColumnConfig, DecoderConfig, EncoderConfig, ModelConfig

# 16x16 input, a few channels: every model-level behaviour, in milliseconds.
TINY = ModelConfig(
    name="tiny",
    encoder=EncoderConfig(input_size=16, stages=((4, 1), (8, 1)), latent_dim=8),
    decoder=DecoderConfig(channels=4, base_size=4, convs_per_block=1),
    column=ColumnConfig(layers=((8, False), (8, True)), fc_dim=12, dropout=0.2),
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads suffer badly on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
