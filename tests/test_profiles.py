"""Profiles: one place for every per-profile setting, consistent with the model registry and the library defaults."""

import dataclasses

import pytest
import torch

from smf_lib.models import KNOWN_MODELS
from smf_lib.profiles import PROFILES, default_profile, get_profile, notebook_settings
from smf_lib.retrofit import MemoryConfig


def test_every_profile_names_a_known_model():
    assert {name: p.model for name, p in PROFILES.items()} == {"tiny": "tiny", "cpu": "smollm2-135m",
                                                                "gpu": "qwen2.5-0.5b"}
    assert all(p.model in KNOWN_MODELS and p.name == name for name, p in PROFILES.items())
    assert default_profile() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_real_profiles_use_the_library_default_memory():
    # The library's defaults are the configuration the results recommend: 65,536 slots at 3/4 and 9/10 depth.
    assert get_profile("cpu").memory == get_profile("gpu").memory == MemoryConfig()
    assert MemoryConfig().resolved_layers(30) == [22, 27]  # SmolLM2-135M's 30 blocks


def test_profiles_are_frozen_and_overridden_by_replace():
    cpu = get_profile("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.memory = MemoryConfig(layers=(1,))
    other = dataclasses.replace(cpu, memory=MemoryConfig(layers=(12, 18)))
    assert other.memory.layers == (12, 18) and get_profile("cpu").memory.layers is None
    assert get_profile(other) is other


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown profile 'laptop'; choose one of tiny, cpu, gpu"):
        get_profile("laptop")


def test_notebook_settings_from_environment(monkeypatch):
    monkeypatch.setenv("SMF_PROFILE", "tiny")
    monkeypatch.setenv("SMF_FAST", "1")
    settings = notebook_settings()
    assert settings.profile is PROFILES["tiny"] and settings.fast
    assert settings.sizes == PROFILES["tiny"].notebook_fast
    assert "top-t 500" in str(settings)
    monkeypatch.setenv("SMF_PROFILE", "laptop")
    with pytest.raises(ValueError, match="laptop"):
        notebook_settings()
