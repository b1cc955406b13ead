"""Tuners: each an ask/tell object with one config class, registered by name in `TUNERS`."""

from lmaas_client.tuners.base import TUNERS, PromptCandidate, Tuner, TunerConfig, make_tuner, register_tuner
from lmaas_client.tuners.bbt import BBTConfig, BBTTuner

__all__ = ["TUNERS", "BBTConfig", "BBTTuner", "PromptCandidate", "Tuner", "TunerConfig", "make_tuner", "register_tuner"]
